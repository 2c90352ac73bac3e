"""Batch inputs: files, globs and folders of TIFFs; a TIFF's planes from its header
(:class:`_Layout`), read one plane or one region at a time; blank planes; one-line
messages for failures."""

from __future__ import annotations

import errno
import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StegoError
from ..tiffcheck import claimed_size_problem, plane_size_problem
from .reports import FileResult


TIFF_SUFFIXES = (".tif", ".tiff")
# raw pixel range of (part of) a plane: (any finite pixel, min, max), for blank planes
_Range = tuple[bool, object, object]


def _is_tiff(path: Path) -> bool:
    return path.name.lower().endswith(TIFF_SUFFIXES)


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]
                  ) -> tuple[list[Path], list[FileResult]]:
    """Files, globs and folders -> ``(tiff_files, problems)``.

    A folder gives the ``.tif`` / ``.tiff`` files directly in it (sorted); a glob (``*``,
    ``?``, ``[``; ``**`` recurses) gives its matching TIFF files (sorted); a file is taken
    as it is. A path that does not exist, a glob that matches nothing and an empty folder
    each give a ``"failed"`` :class:`FileResult`; duplicates are dropped.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    problems: list[FileResult] = []
    for item in inputs:
        text = str(item)
        if any(c in text for c in "*?[") and not Path(text).exists():
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            found = [p for p in found if p.is_file() and _is_tiff(p)]
            if not found:
                problems.append(FileResult(text, "failed", "no TIFF files match this pattern"))
            files.extend(found)
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).iterdir() if p.is_file() and _is_tiff(p)
                           and not p.name.startswith("."))
            if not found:
                problems.append(FileResult(text, "failed", "folder holds no .tif/.tiff files"))
            files.extend(found)
        elif Path(text).exists():
            files.append(Path(text))
        else:
            problems.append(FileResult(text, "failed", "does not exist"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


def _base_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@dataclass(frozen=True)
class _Layout:
    """Where the planes of a TIFF's first series are: leading axes x (Y, X[, RGB])."""

    shape: tuple[int, ...]
    axes: str
    dtype: str
    spatial: tuple[int, int]      # positions of the Y and X axes
    rgb_axis: int | None          # position of the colour / channel axis (RGB(A), C, S)
    leading: tuple[int, ...]      # positions of every other axis, in order

    @property
    def n_channels(self) -> int:
        return 1 if self.rgb_axis is None else self.shape[self.rgb_axis]

    @property
    def out_axes(self) -> str:
        """Axes of the labels (:attr:`out_shape`): the leading axes' letters, then ``YX``."""
        keep = [self.axes[a] for a in self.leading
                if not (self.axes[a] in "CS" and self.shape[a] == 1)]
        return "".join(keep) + "YX"

    @property
    def leading_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.leading)

    @property
    def n_planes(self) -> int:
        return int(np.prod(self.leading_shape, dtype=np.int64))

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.shape[self.spatial[0]], self.shape[self.spatial[1]]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the labels: leading axes (size-1 channel/sample axes dropped), then Y, X."""
        keep = [self.shape[a] for a in self.leading
                if not (self.axes[a] in "CS" and self.shape[a] == 1)]
        return (*keep, *self.plane_shape)

    def index(self, flat: int) -> tuple:
        """The numpy index of plane ``flat`` (C order over the leading axes)."""
        idx: list = [slice(None)] * len(self.shape)
        for axis, i in zip(self.leading, np.unravel_index(flat, self.leading_shape) if
                           self.leading else ()):
            idx[axis] = int(i)
        return tuple(idx)


def _inspect(path: Path) -> _Layout:
    """Read a TIFF's header (not its pixels) and find its planes.

    Raises:
        StegoError: not a (readable) TIFF, unsupported dtype, non-RGB channels, or a shape
            without two spatial axes.
    """
    import tifffile

    if not path.is_file():
        raise StegoError("does not exist" if not path.exists() else "is not a file")
    try:
        with tifffile.TiffFile(str(path)) as tif:
            if not tif.series:
                raise StegoError("TIFF holds no image")
            series = tif.series[0]
            shape = tuple(int(s) for s in series.shape)
            axes = series.axes.upper()
            dtype = np.dtype(series.dtype)
            problem = claimed_size_problem(series, path)
            if problem:
                raise StegoError(problem)
    except StegoError:
        raise
    except Exception as exc:
        raise StegoError(f"cannot read: not a TIFF, or a corrupt one ({_short(exc)})") from None
    if dtype.kind not in "biuf":
        raise StegoError(f"unsupported dtype {dtype}: use integer or float images")
    rgb_axis = None  # the colour / channel axis: kept in each plane (last), mapped to RGB
    if "C" in axes and shape[axes.index("C")] > 1:
        rgb_axis = axes.index("C")
    if "S" in axes and shape[axes.index("S")] > 1:
        if rgb_axis is not None:
            raise StegoError(f"has both channels and samples per pixel (axes {axes}, shape "
                             f"{shape}): save it with one channel axis")
        rgb_axis = axes.index("S")
    rest = [i for i in range(len(shape)) if i != rgb_axis]
    if len(rest) < 2:
        raise StegoError(f"shape {shape} (axes {axes}) is not an image: need at least 2 "
                         "spatial axes")
    spatial = (rest[-2], rest[-1])
    if min(shape[spatial[0]], shape[spatial[1]]) < 1:
        raise StegoError(f"empty image of shape {shape}")
    problem = plane_size_problem((shape[spatial[0]], shape[spatial[1]]), shape)
    if problem:
        raise StegoError(problem)
    return _Layout(shape, axes, dtype.str, spatial, rgb_axis, tuple(rest[:-2]))


def _read_plane(path: str | Path, layout: _Layout, flat: int) -> np.ndarray:
    """Plane ``flat`` of a TIFF as ``(H, W)`` or ``(H, W, 3|4)``; reads only that plane."""
    import tifffile
    import zarr

    store = tifffile.imread(str(path), aszarr=True, series=0, level=0)
    try:
        plane = np.asarray(zarr.open(store, mode="r")[layout.index(flat)])
    finally:
        store.close()
    if layout.rgb_axis is not None and layout.rgb_axis < layout.spatial[0]:
        plane = np.moveaxis(plane, 0, -1)
    return plane


def read_planes(path: str | Path) -> list[np.ndarray]:
    """Every plane of a TIFF (``(H, W)`` or ``(H, W, 3)``), with the batch job's checks.

    Raises:
        StegoError: unreadable, truncated or unsupported file (one-line message).
    """
    path = Path(path)
    layout = _inspect(path)
    try:
        return [_read_plane(path, layout, i) for i in range(layout.n_planes)]
    except Exception as exc:
        raise StegoError(f"cannot read pixels: truncated or corrupt TIFF ({_short(exc)})") from None


def _blank_reason(plane: np.ndarray) -> str | None:
    """Why a plane has nothing to segment (all NaN / constant), or ``None``."""
    if plane.dtype.kind == "f":
        finite = np.isfinite(plane)
        if not finite.any():
            return "every pixel is NaN or infinite"
        values = plane[finite] if not finite.all() else plane
    else:
        values = plane
    lo, hi = values.min(), values.max()
    if lo == hi:
        return f"constant image (every pixel is {lo.item()!r})"
    return None


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException, stage: str) -> str:
    """A one-line message for an exception raised while ``stage`` (reading/predicting/...)."""
    if isinstance(exc, StegoError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{stage}: no space left on device ({exc.filename or 'output folder'})"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{stage}: {exc.strerror}{where}"
    if stage == "reading":
        return f"cannot read pixels: truncated or corrupt TIFF ({_short(exc)})"
    return f"{stage}: {type(exc).__name__}: {_short(exc)}"


class _PlaneArray:
    """Plane ``flat`` of a TIFF as a lazily read ``(H, W)`` or ``(H, W, C)`` array: slicing
    ``[ys, xs]`` reads only that region (what :class:`~napari_stego.io.ImageSource` needs).

    Use it as a context manager (the TIFF stays open meanwhile). The last region read is
    kept: reading a part of it again (a tile's core after its core plus halo) reads nothing.
    """

    def __init__(self, path: str | Path, layout: _Layout, flat: int) -> None:
        import tifffile
        import zarr

        self.layout, self.flat = layout, flat
        h, w = layout.plane_shape
        rgb = layout.rgb_axis
        self.shape = (h, w) if rgb is None else (h, w, layout.shape[rgb])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(layout.dtype)
        self._store = tifffile.imread(str(path), aszarr=True, series=0, level=0)
        try:
            self._arr = zarr.open(self._store, mode="r")
        except BaseException:
            self._store.close()
            raise
        self._last: tuple[tuple[int, int, int, int], np.ndarray] | None = None

    def __enter__(self) -> _PlaneArray:  # noqa: PYI034 (Python 3.10: no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._store.close()

    def __getitem__(self, key) -> np.ndarray:
        key = (key if isinstance(key, tuple) else (key,)) + (slice(None),) * 2
        (y0, y1, _), (x0, x1, _) = key[0].indices(self.shape[0]), key[1].indices(self.shape[1])
        if self._last is not None:
            (a0, a1, b0, b1), block = self._last
            if a0 <= y0 and y1 <= a1 and b0 <= x0 and x1 <= b1:
                return block[y0 - a0:y1 - a0, x0 - b0:x1 - b0]
        idx = list(self.layout.index(self.flat))
        sy, sx = self.layout.spatial
        idx[sy], idx[sx] = slice(y0, y1), slice(x0, x1)
        block = np.asarray(self._arr[tuple(idx)])
        rgb = self.layout.rgb_axis
        if rgb is not None:  # the colour axis last, wherever the file keeps it
            block = np.moveaxis(block, int(sy < rgb) + int(sx < rgb), -1)
        self._last = ((y0, y1, x0, x1), block)
        return block


def _plane_source(array: _PlaneArray):
    from ..io import ImageSource

    return ImageSource(array, "YX" if array.ndim == 2 else "YXC")


def _pixel_range(pixels: np.ndarray) -> _Range:
    """``(any finite pixel, min, max)`` of raw pixels, min and max over the finite ones."""
    if pixels.dtype.kind == "f":
        finite = np.isfinite(pixels)
        if not finite.any():
            return False, None, None
        if not finite.all():
            pixels = pixels[finite]
    return True, pixels.min().item(), pixels.max().item()


def _merge_ranges(a: _Range | None, b: _Range | None) -> _Range | None:
    if a is None or not a[0]:
        return b if b is not None else a
    if b is None or not b[0]:
        return a
    return True, min(a[1], b[1]), max(a[2], b[2])


def _range_reason(r: _Range | None) -> str | None:
    """:func:`_blank_reason` of a plane seen tile by tile (from its tiles' ranges)."""
    if r is None or not r[0]:
        return "every pixel is NaN or infinite"
    if r[1] == r[2]:
        return f"constant image (every pixel is {r[1]!r})"
    return None
