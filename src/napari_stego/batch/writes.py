"""Batch outputs: atomic writes (temporary name, then rename), labels / probabilities
as TIFF or zarr, and the resumable parts of stacks (one per plane) and of big planes
(one per tile), streamed into tiled outputs."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io import META_KEY
from ..labels import with_axes
from .inputs import _Range

if TYPE_CHECKING:
    from .tasks import _AssembleTask

WORK_DIR = ".napari-stego-work"
FORMATS = ("tif", "zarr", "ome-zarr")
EXTENSIONS = {"tif": ".tif", "zarr": ".zarr", "ome-zarr": ".ome.zarr"}
_ZARR_CHUNK = 2048
# tile cores of a tiled plane: ((y0, y1), ...) along Y, ((x0, x1), ...) along X
_Grid = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _atomic_write(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary path next to ``final``, then rename it.

    On any error (or interrupt) the temporary file is removed and ``final`` is untouched.
    """
    tmp = _tmp_name(final)
    try:
        write(tmp)
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if final.is_dir() and not final.is_symlink():  # zarr overwrite: move the old one away
            old = _tmp_name(final)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
    except BaseException:
        _remove(tmp)
        raise
    return final


def _clean_partials(final: Path) -> None:
    """Remove temporaries a killed job left next to ``final``."""
    for p in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        _remove(p)


def _tiff_writer(data: np.ndarray | Iterable[np.ndarray], shape, dtype, meta: dict,
                 tile: tuple[int, int] | None = None):
    """``data``: planes (pages), or with ``tile`` the TIFF tiles of every page in order."""
    def write(tmp: Path) -> None:
        import tifffile

        from ..labels import tiff_kwargs

        tifffile.imwrite(str(tmp), data, shape=tuple(shape), dtype=dtype, tile=tile,
                         **tiff_kwargs(tuple(shape), dtype, meta))
    return write


def _zarr_array(tmp: Path, shape: tuple, dtype, chunks: tuple, fmt: str):
    """The array level 0 is written to: the zarr output itself, or an OME-Zarr group's
    array ``0`` (see :func:`_zarr_finish`)."""
    import zarr

    if fmt == "ome-zarr":
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        return group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0)
    return zarr.create_array(store=str(tmp), shape=shape, dtype=dtype, chunks=chunks,
                             zarr_format=3, fill_value=0)


def _zarr_finish(tmp: Path, arr, meta: dict, fmt: str) -> None:
    """The metadata of a zarr output; for OME-Zarr also the pyramid and the NGFF axes
    and scale (:func:`napari_stego.ngff.finish`)."""
    meta = with_axes(meta, tuple(arr.shape))
    if fmt == "ome-zarr":
        from ..ngff import finish

        finish(tmp, meta)
    else:
        arr.attrs[META_KEY] = meta


def _zarr_writer(planes: Iterable[np.ndarray], shape, dtype, meta: dict, plane_ndim: int,
                 fmt: str = "zarr"):
    def write(tmp: Path) -> None:
        shape_ = tuple(shape)
        chunks = (1,) * (len(shape_) - 2) + tuple(min(s, _ZARR_CHUNK) for s in shape_[-2:])
        arr = _zarr_array(tmp, shape_, dtype, chunks, fmt)
        lead = shape_[:len(shape_) - plane_ndim]
        for idx, plane in zip(np.ndindex(*lead), planes):
            arr[idx] = plane
        _zarr_finish(tmp, arr, meta, fmt)
    return write


def _write_output(final: Path, planes: Iterable[np.ndarray], shape, dtype, meta: dict,
                  fmt: str, plane_ndim: int = 2) -> Path:
    """Atomically write a labels (``plane_ndim=2``) or probabilities (3) output."""
    if fmt in ("zarr", "ome-zarr"):
        return _atomic_write(final, _zarr_writer(planes, shape, dtype, meta, plane_ndim, fmt))
    if plane_ndim == 3:  # TIFF pages are 2D: one page per cluster
        planes = (p for stack in planes for p in stack)
    return _atomic_write(final, _tiff_writer(iter(planes), shape, dtype, meta))


def _save_part(path: Path, labels: np.ndarray, proba: np.ndarray | None, blank: str | None):
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            arrays = dict(labels=labels, blank=np.array(blank or ""))
            if proba is not None:
                arrays["proba"] = proba
            np.savez(f, **arrays)
    _atomic_write(path, write)


def _part_ok(path: Path, shape: tuple[int, int], proba: bool) -> bool:
    try:
        with np.load(path) as z:
            return z["labels"].shape == tuple(shape) and (not proba or "proba" in z.files)
    except Exception:
        return False


def _grid_tiles(grid: _Grid) -> list[tuple[int, int]]:
    """Every ``(row, column)`` of a grid, row-major."""
    return [(iy, ix) for iy in range(len(grid[0])) for ix in range(len(grid[1]))]


def _core_shape(grid: _Grid, tile: tuple[int, int]) -> tuple[int, int]:
    (y0, y1), (x0, x1) = grid[0][tile[0]], grid[1][tile[1]]
    return y1 - y0, x1 - x0


def _tile_part_path(work: str | Path, flat: int, tile: tuple[int, int]) -> Path:
    return Path(work) / f"plane_{flat:07d}_tile_{tile[0]:04d}_{tile[1]:04d}.npz"


def _save_tile_part(path: Path, labels: np.ndarray, proba: np.ndarray | None,
                    rng: _Range) -> None:
    """One tile's labels ``(h, w)``, probabilities (``proba<k>``: ``(h, w)`` each, so the
    assembly reads one cluster at a time) and raw pixel range."""
    def write(tmp: Path) -> None:
        arrays = dict(labels=labels, finite=np.array(bool(rng[0])),
                      lo=np.asarray(rng[1] if rng[0] else 0),
                      hi=np.asarray(rng[2] if rng[0] else 0))
        if proba is not None:
            arrays.update({f"proba{k}": proba[k] for k in range(proba.shape[0])})
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    _atomic_write(path, write)


def _tile_part_range(path: Path, shape: tuple[int, int], n_proba: int) -> _Range | None:
    """The pixel range a finished tile part records, or ``None`` if it is missing, damaged
    or lacks what this job needs (``n_proba`` probability maps)."""
    try:
        with np.load(path) as z:
            if z["labels"].shape != tuple(shape) or any(f"proba{k}" not in z.files
                                                         for k in range(n_proba)):
                return None
            if not bool(z["finite"]):
                return False, None, None
            return True, z["lo"].item(), z["hi"].item()
    except Exception:
        return None


class _TileReader:
    """Regions of one map (``key``: ``"labels"`` or ``"proba<k>"``) of a tiled plane, read
    back from its tile parts. Holds the parts of the tile rows the last region spans (one
    row of tiles when regions follow the tile rows), so regions must go top to bottom."""

    def __init__(self, work: str | Path, flat: int, grid: _Grid, key: str) -> None:
        self.work, self.flat, self.grid, self.key = Path(work), flat, grid, key
        self._rows: dict[int, list[np.ndarray]] = {}

    def _row(self, iy: int) -> list[np.ndarray]:
        if iy not in self._rows:
            row = []
            for ix in range(len(self.grid[1])):
                with np.load(_tile_part_path(self.work, self.flat, (iy, ix))) as z:
                    row.append(z[self.key])
            self._rows[iy] = row
        return self._rows[iy]

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0, y1) x [x0, x1)`` of the plane."""
        ys, xs = self.grid
        rows = [iy for iy, (a, b) in enumerate(ys) if a < y1 and b > y0]
        for iy in [i for i in self._rows if i not in rows]:
            del self._rows[iy]
        out = None
        for iy in rows:
            a, b = ys[iy]
            for ix, (c, d) in enumerate(xs):
                if c >= x1 or d <= x0:
                    continue
                part = self._row(iy)[ix]
                if out is None:
                    out = np.empty((y1 - y0, x1 - x0), part.dtype)
                ra, rb, ca, cb = max(a, y0), min(b, y1), max(c, x0), min(d, x1)
                out[ra - y0:rb - y0, ca - x0:cb - x0] = part[ra - a:rb - a, ca - c:cb - c]
        return out


def _tiff_tile_side(cores: tuple[tuple[int, int], ...], length: int) -> int:
    """TIFF tile side along one axis: the prediction tile's core when TIFF allows it (a
    multiple of 16, at most 2048), else 512; never much longer than the axis."""
    from ..tiling import round_up

    core = cores[0][1] - cores[0][0]
    side = core if core % 16 == 0 and core <= 2048 else 512
    return min(side, round_up(length, 16))


def _write_tiled(final: Path, task: _AssembleTask, shape: tuple[int, ...], dtype: np.dtype,
                 meta: dict, keys: list[str]) -> Path:
    """Atomically write the labels (``keys == ["labels"]``, ``shape`` ``(*lead, H, W)``) or
    probabilities (``proba<k>``, ``(*lead, K, H, W)``) of tiled planes from their tile parts,
    holding at most a row of tiles: a tiled TIFF, or zarr with one chunk per tile core."""
    grid, work, h, w = task.grid, task.work, shape[-2], shape[-1]
    lead = task.layout.out_shape[:-2]
    per_cluster = keys != ["labels"]  # probabilities: a K axis before Y, X
    pages = [(flat, j, idx + ((j,) if per_cluster else ()))
             for flat, idx in enumerate(np.ndindex(*lead)) for j in range(len(keys))]
    fmt = task.settings.format
    if fmt in ("zarr", "ome-zarr"):
        def write(tmp: Path) -> None:
            chunks = (1,) * (len(shape) - 2) + _core_shape(grid, (0, 0))
            arr = _zarr_array(tmp, tuple(shape), dtype, chunks, fmt)
            for flat in range(len(pages) // len(keys)):
                for tile in _grid_tiles(grid):
                    (y0, y1), (x0, x1) = grid[0][tile[0]], grid[1][tile[1]]
                    with np.load(_tile_part_path(work, flat, tile)) as z:
                        for _, j, index in pages[flat * len(keys):(flat + 1) * len(keys)]:
                            arr[index + (slice(y0, y1), slice(x0, x1))] = z[keys[j]]
            _zarr_finish(tmp, arr, meta, fmt)
        return _atomic_write(final, write)
    th, tw = _tiff_tile_side(grid[0], h), _tiff_tile_side(grid[1], w)

    def tiles():
        for flat, j, _ in pages:
            reader = _TileReader(work, flat, grid, keys[j])
            for y in range(0, h, th):
                for x in range(0, w, tw):
                    yield reader.region(y, min(y + th, h), x, min(x + tw, w))
    return _atomic_write(final, _tiff_writer(tiles(), shape, dtype, meta, tile=(th, tw)))
