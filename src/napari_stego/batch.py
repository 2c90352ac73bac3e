"""Segment many files: resumable, atomic, on one machine or a dask.distributed cluster.

The napari-free engine behind ``napari-stego fit | segment | evaluate`` and
:func:`napari_stego.segment_files`.

How a ``segment`` job runs
--------------------------
1. *Plan* (on the caller's machine): expand files / globs / folders; read each TIFF's
   header (shape, axes, dtype) without its pixels; decide what is already finished. An
   output counts as finished only when it opens, carries napari-stego metadata with the
   same model hash, settings and input signature (size, mtime), has the expected shape
   and dtype, and its last plane decodes.
2. *Planes*: the unit of work is one 2D plane (``(H, W)`` or ``(H, W, 3)``) of one file;
   every leading axis (T, Z, Q, ...) of a stack is split into planes. A worker reads just
   that plane, predicts it through :meth:`StegoModel.predict` (``predict_proba`` with
   ``probabilities=True``) and writes the result itself, so the caller never holds pixel
   data. A single-plane file is written straight to its output; a stack's planes go to
   per-plane parts in ``OUT/.napari-stego-work/<name>/`` and a last task assembles them.
   Parts survive a killed job, so a re-run finishes a big stack without recomputing it.
3. *Tiles*: a plane bigger than one tile of the model's
   :class:`~napari_stego.tiling.TileConfig` (``features.is_single_tile`` is false) is not
   given to one worker whole. A *statistics* task measures the plane's intensity mapping
   once (:func:`~napari_stego.io.fit_intensity`, as ``StegoModel.predict`` does), then one
   task per tile core reads only that core plus its halo from the TIFF and predicts it with
   :class:`~napari_stego.lazy.TilePredictor` (the computation of ``StegoModel.predict`` on a
   big image, chunk for chunk: the labels are the same); with ``crf`` the core is grown by
   the CRF's halo, refined, and cropped back. Each tile writes a tile part (resumable like
   a stack's planes); the assembly task streams the parts into the output (a tiled TIFF, or
   zarr chunks of one tile core) holding one row of tiles. No task holds a whole big plane
   (the statistics read at most 8 M values). Models that blend tiles with
   ``blend="taper"`` need the whole plane's feature map and keep the whole-plane path.
4. *Writes are atomic*: every file (parts included) is written under a hidden temporary
   name in the same folder and renamed when complete; a killed job never leaves a
   half-written output under the output's name, and inputs are only ever read.

Models are loaded once per worker process (:func:`cached_model`, keyed by the model
file's SHA-256, device and weights), not once per plane or tile.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import Cancelled, StegoError
from .io import META_KEY
from .outputs import (BLOCKED, REDO, VALID, check_model_out, check_output,
                      remove_model_partials)
from .tiffcheck import claimed_size_problem, plane_size_problem

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]
WORK_DIR = ".napari-stego-work"
TIFF_SUFFIXES = (".tif", ".tiff")
FORMATS = ("tif", "zarr")
_ZARR_CHUNK = 2048

__all__ = [
    "BatchReport", "FileResult", "FitReport", "cached_model", "evaluate_folders",
    "expand_inputs", "fit_files", "read_planes", "segment_files",
]


# ============================================================================ results
@dataclass
class FileResult:
    """What happened to one input.

    ``status`` is one of ``"written"`` (segmented now), ``"existing"`` (a finished output
    was already there and was kept), ``"skipped"`` (nothing to segment: all-NaN or
    constant), ``"failed"`` (``message`` says why), or for ``fit`` ``"used"``.
    """

    input: str
    status: str
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    planes: int = 0
    pixels: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        """One line for a terminal: ``<input>: <message>``."""
        return f"{self.input}: {self.message}" if self.message else self.input


@dataclass
class BatchReport:
    """The outcome of :func:`segment_files`: one :class:`FileResult` per input."""

    results: list[FileResult]
    out: str
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def written(self) -> int:
        return self._count("written")

    @property
    def existing(self) -> int:
        return self._count("existing")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def ok(self) -> bool:
        """True when every input has its finished output."""
        return self.failed == 0 and self.skipped == 0

    @property
    def exit_code(self) -> int:
        """0: every input has its output; 1: some inputs failed or were skipped."""
        return 0 if self.ok else 1

    @property
    def problems(self) -> list[FileResult]:
        return [r for r in self.results if r.status in ("failed", "skipped")]

    def summary(self) -> str:
        planes = sum(r.planes for r in self.results if r.status == "written")
        mpx = sum(r.pixels for r in self.results if r.status == "written") / 1e6
        rate = f", {mpx / self.seconds:.3g} Mpx/s" if self.seconds > 0 and mpx else ""
        return (f"{len(self.results)} inputs: {self.written} written, {self.existing} already "
                f"done, {self.skipped} skipped, {self.failed} failed ({planes} planes, "
                f"{mpx:.3g} Mpx in {self.seconds:.1f} s{rate}) -> {self.out}")

    def __repr__(self) -> str:
        return f"BatchReport({self.summary()})"


@dataclass
class FitReport:
    """The outcome of :func:`fit_files`: the model file and what each input gave."""

    model: str
    results: list[FileResult]
    n_images: int
    warnings: list[str] = field(default_factory=list)  # the fit's (model.info["warnings"])

    @property
    def exit_code(self) -> int:
        return 0 if all(r.status == "used" for r in self.results) else 1

    @property
    def problems(self) -> list[FileResult]:
        return [r for r in self.results if r.status != "used"]


# ============================================================================ inputs
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


# ============================================================================ layout
@dataclass(frozen=True)
class _Layout:
    """Where the planes of a TIFF's first series are: leading axes x (Y, X[, RGB])."""

    shape: tuple[int, ...]
    axes: str
    dtype: str
    spatial: tuple[int, int]      # positions of the Y and X axes
    rgb_axis: int | None          # position of the colour axis, if RGB(A)
    leading: tuple[int, ...]      # positions of every other axis, in order

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
            photometric = int(series.keyframe.photometric)
            problem = claimed_size_problem(series, path)
            if problem:
                raise StegoError(problem)
    except StegoError:
        raise
    except Exception as exc:
        raise StegoError(f"cannot read: not a TIFF, or a corrupt one ({_short(exc)})") from None
    if dtype.kind not in "biuf":
        raise StegoError(f"unsupported dtype {dtype}: use integer or float images")
    if "C" in axes and shape[axes.index("C")] > 1:
        raise StegoError(f"has {shape[axes.index('C')]} channels (axes {axes}, shape {shape}): "
                         "save the channel to segment as its own grey file")
    rgb_axis = None
    if "S" in axes:
        s = axes.index("S")
        n = shape[s]
        if n in (3, 4) and photometric == 2:  # RGB(A), interleaved or planar
            rgb_axis = s
        elif n > 1:
            raise StegoError(f"has {n} samples per pixel that are not RGB (axes {axes}, shape "
                             f"{shape}): save the channel to segment as its own grey file")
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


# ============================================================================ errors
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


# ============================================================================ models
_MODELS: dict[tuple, object] = {}
_MODELS_LOCK = threading.Lock()
_MODEL_LOADS = 0  # how many times this process really loaded a model (tests read it)
_MAX_MODELS = 4


@dataclass(frozen=True)
class _ModelRef:
    path: str
    sha256: str
    weights: str | None = None
    device: str | None = None

    @property
    def key(self) -> tuple:
        return self.sha256, self.weights, self.device


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_model(path: str | Path, *, weights: str | Path | None = None,
                 device: str | None = None, sha256: str | None = None):
    """:meth:`StegoModel.load` once per process and model file (thread-safe).

    Workers call this for every plane; only the first call in a process loads. The key is
    the file's SHA-256 (so a changed file is reloaded), the weights file and the device.
    """
    ref = _ModelRef(str(path), sha256 or _file_sha256(Path(path)),
                    None if weights is None else str(weights), device)
    return _model_of(ref)


def _model_of(ref: _ModelRef):
    global _MODEL_LOADS
    with _MODELS_LOCK:
        model = _MODELS.get(ref.key)
        if model is None:
            from .model import StegoModel

            model = StegoModel.load(ref.path, weights=ref.weights, device=ref.device)
            if len(_MODELS) >= _MAX_MODELS:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[ref.key] = model
            _MODEL_LOADS += 1
        return model


def _prepare_model(model, out: Path, weights, device, local: bool
                   ) -> tuple[_ModelRef, object, str, Path | None]:
    """``(ref, model, shown_path, temporary_file)``: what workers load, the model loaded
    here (so an unreadable or incompatible model fails at once, before any work), the path
    recorded in the outputs, and a file to delete when the job ends.

    A model object is saved into the output's work folder so that worker processes (which
    share no memory with this one) can load it; with an in-process scheduler the object
    itself is used.
    """
    from .model import StegoModel

    dev = None if device in (None, "auto") else str(device)
    wts = None if weights is None else str(weights)
    if isinstance(model, StegoModel):
        work = out / WORK_DIR
        work.mkdir(parents=True, exist_ok=True)
        tmp = model.save(work / f"model-{uuid.uuid4().hex[:8]}.stego")
        sha = _file_sha256(tmp)
        path = work / f"model-{sha[:16]}.stego"
        os.replace(tmp, path)
        ref = _ModelRef(str(path.resolve()), sha, wts, dev)
        if local:
            with _MODELS_LOCK:
                _MODELS[ref.key] = model
        return ref, model, "<in-memory model>", path
    path = Path(model)
    if not path.is_file():
        raise StegoError(f"model file {path} does not exist")
    ref = _ModelRef(str(path.resolve()), _file_sha256(path), wts, dev)
    if local:
        return ref, _model_of(ref), ref.path, None
    # the workers load it themselves; load it here too, on the CPU, to fail early
    return ref, StegoModel.load(path, weights=weights, device="cpu"), ref.path, None


# ============================================================================ writing
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

        tifffile.imwrite(str(tmp), data, shape=tuple(shape), dtype=dtype, compression="zlib",
                         photometric="minisblack", metadata={META_KEY: json.dumps(meta)},
                         tile=tile)
    return write


def _zarr_writer(planes: Iterable[np.ndarray], shape, dtype, meta: dict, plane_ndim: int):
    def write(tmp: Path) -> None:
        import zarr

        shape_ = tuple(shape)
        chunks = (1,) * (len(shape_) - 2) + tuple(min(s, _ZARR_CHUNK) for s in shape_[-2:])
        arr = zarr.create_array(store=str(tmp), shape=shape_, dtype=dtype, chunks=chunks,
                                zarr_format=3, fill_value=0)
        lead = shape_[:len(shape_) - plane_ndim]
        for idx, plane in zip(np.ndindex(*lead), planes):
            arr[idx] = plane
        arr.attrs[META_KEY] = meta
    return write


def _write_output(final: Path, planes: Iterable[np.ndarray], shape, dtype, meta: dict,
                  fmt: str, plane_ndim: int = 2) -> Path:
    """Atomically write a labels (``plane_ndim=2``) or probabilities (3) output."""
    if fmt == "zarr":
        return _atomic_write(final, _zarr_writer(planes, shape, dtype, meta, plane_ndim))
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


# ============================================================================ validation
def _part_ok(path: Path, shape: tuple[int, int], proba: bool) -> bool:
    try:
        with np.load(path) as z:
            return z["labels"].shape == tuple(shape) and (not proba or "proba" in z.files)
    except Exception:
        return False


# ============================================================================ tasks
@dataclass(frozen=True)
class _Settings:
    crf: bool = False
    probabilities: bool = False
    format: str = "tif"


@dataclass(frozen=True)
class _PlaneTask:
    model: _ModelRef
    settings: _Settings
    input: str
    layout: _Layout
    flat: int
    labels_out: str | None = None  # single-plane file: write the outputs here ...
    proba_out: str | None = None
    meta: dict | None = None
    part: str | None = None        # ... a stack: write the plane to this part


# tile cores of a tiled plane: ((y0, y1), ...) along Y, ((x0, x1), ...) along X
_Grid = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]
# raw pixel range of (part of) a plane: (any finite pixel, min, max), for blank planes
_Range = tuple[bool, object, object]


@dataclass(frozen=True)
class _StatsTask:
    """Measure a tiled plane's intensity mapping once, for all its tiles."""

    input: str
    layout: _Layout
    flat: int
    intensity: object             # the model's IntensityConfig
    crf_intensity: object | None  # the CRF's IntensityConfig, with --crf


@dataclass(frozen=True)
class _TileTask:
    """Predict one tile core of a plane and write it to ``part``."""

    model: _ModelRef
    settings: _Settings
    input: str
    layout: _Layout
    flat: int
    tile: tuple[int, int]          # (row, column) in the grid
    core: tuple[tuple[int, int], tuple[int, int]]  # the core the caller expects (a check)
    stats: tuple                   # (IntensityStats of the features, of the CRF or None)
    part: str


@dataclass
class _PlaneResult:
    flat: int
    ok: bool = True
    blank: str | None = None
    message: str = ""
    pixels: int = 0
    seconds: float = 0.0
    worker: str = ""
    wrote: bool = False
    stats: tuple | None = None     # a statistics task's result
    range: _Range | None = None    # a tile task's core pixel range


@dataclass(frozen=True)
class _AssembleTask:
    settings: _Settings
    layout: _Layout
    n_clusters: int
    parts: tuple[str, ...]
    labels_out: str
    proba_out: str | None
    meta: dict
    work: str
    grid: _Grid | None = None      # tiled planes: parts are tiles, see _tile_part_path


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _label_dtype(n_clusters: int) -> np.dtype:
    return np.dtype(np.uint8 if n_clusters <= 256 else np.uint16)


def _predict_plane(model, plane: np.ndarray, settings: _Settings
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels ``(H, W)`` and, when asked, probabilities ``(K, H, W)`` of one plane."""
    if not settings.probabilities:
        return model.predict(plane, crf=settings.crf), None
    probs = model.predict_proba(plane)
    if settings.crf:
        from .crf import dense_crf

        probs = dense_crf(plane, probs)
    return probs.argmax(0).astype(_label_dtype(model.n_clusters)), probs.astype(np.float32)


def _on_dask_worker() -> bool:
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def _pin_worker_dask() -> None:
    """On a dask worker, make dask work *inside* a plane task (a tiled predictor's
    ``.compute()``) run in the task's own thread. Without this dask would pick the worker's
    client and try to ship that inner graph, model included, back to the scheduler. The
    plane is the unit the cluster distributes; the worker process is ours to configure."""
    import dask

    if dask.config.get("scheduler", None) != "sync":
        dask.config.set({"scheduler": "sync"})


def _start_task(flat: int) -> tuple[_PlaneResult, float]:
    """Worker side, first thing in a plane or tile task: dask set up for the worker, an
    empty result naming the worker, and the start time."""
    if _on_dask_worker():
        _pin_worker_dask()
    return _PlaneResult(flat, worker=_worker_name()), time.perf_counter()


def _run_plane(task: _PlaneTask) -> _PlaneResult:
    """Worker side: read one plane, predict it, write it. Never raises for bad data."""
    result, t0 = _start_task(task.flat)
    stage = "reading"
    try:
        plane = _read_plane(task.input, task.layout, task.flat)
        result.blank = _blank_reason(plane)
        if result.blank is not None and task.part is None:  # a lone blank plane:
            result.seconds = time.perf_counter() - t0            # nothing to segment
            return result
        stage = "loading the model"
        model = _model_of(task.model)
        stage = "predicting"
        labels, proba = _predict_plane(model, plane, task.settings)
        result.pixels = int(labels.size)
        stage = "writing"
        if task.part is not None:
            _save_part(Path(task.part), labels, proba, result.blank)
        else:
            fmt = task.settings.format
            meta = dict(task.meta, kind="labels")
            shape = task.layout.out_shape
            _write_output(Path(task.labels_out), [labels], shape, labels.dtype,
                          dict(meta, shape=list(shape)), fmt)
            if proba is not None:
                pshape = (*shape[:-2], proba.shape[0], *shape[-2:])
                _write_output(Path(task.proba_out), [proba], pshape, np.float32,
                              dict(meta, kind="probabilities", shape=list(pshape),
                                   dtype="float32"), fmt, plane_ndim=3)
            result.wrote = True
    except Exception as exc:
        result.ok = False
        result.message = _describe(exc, stage)
    result.seconds = time.perf_counter() - t0
    return result


def _run_assemble(task: _AssembleTask) -> _PlaneResult:
    """Worker side: stack a file's plane parts into its outputs, then drop the parts."""
    t0 = time.perf_counter()
    result = _PlaneResult(-1, worker=_worker_name())
    try:
        shape = task.layout.out_shape
        dtype = _label_dtype(task.n_clusters)

        def planes(key: str):
            for part in task.parts:
                with np.load(part) as z:
                    yield z[key]

        fmt = task.settings.format
        meta = dict(task.meta, kind="labels", shape=list(shape))
        pshape = (*shape[:-2], task.n_clusters, *shape[-2:])
        pmeta = dict(meta, kind="probabilities", shape=list(pshape), dtype="float32")
        if task.grid is not None:  # tiled planes: stream the tile parts
            _write_tiled(Path(task.labels_out), task, shape, dtype, meta, ["labels"])
            if task.proba_out is not None:
                _write_tiled(Path(task.proba_out), task, pshape, np.dtype(np.float32), pmeta,
                             [f"proba{k}" for k in range(task.n_clusters)])
        else:
            _write_output(Path(task.labels_out), planes("labels"), shape, dtype, meta, fmt)
            if task.proba_out is not None:
                _write_output(Path(task.proba_out), planes("proba"), pshape, np.float32, pmeta,
                              fmt, plane_ndim=3)
        shutil.rmtree(task.work, ignore_errors=True)
        result.wrote = True
    except Exception as exc:
        result.ok = False
        result.message = _describe(exc, "writing")
    result.seconds = time.perf_counter() - t0
    return result


# ============================================================================ tiles
def _plane_grid(model, shape2d: tuple[int, int]) -> _Grid | None:
    """The tile cores a plane of ``shape2d`` pixels is predicted in, or ``None`` when it is
    predicted whole: it fits one tile (``features.is_single_tile``), or the model blends
    tiles with ``"taper"`` (which needs the feature map of the whole plane).

    The cores are those of :class:`~napari_stego.lazy.TilePredictor` (``tiling.cover_1d``
    with the model's tile and halo, aligned to the backbone's ``pad_to``).
    """
    from .features import is_single_tile, tile_halo
    from .tiling import cover_1d

    if model.tile_config.blend != "crop" or is_single_tile(
            tuple(shape2d), model.backbone, model.feature_config, model.tile_config):
        return None
    tile, halo = tile_halo(model.tile_config, model.backbone)
    align = model.backbone.spec.pad_to
    return tuple(tuple(s.core for s in cover_1d(int(n), tile, halo, align)) for n in shape2d)


def _grid_tiles(grid: _Grid) -> list[tuple[int, int]]:
    """Every ``(row, column)`` of a grid, row-major."""
    return [(iy, ix) for iy in range(len(grid[0])) for ix in range(len(grid[1]))]


def _core_shape(grid: _Grid, tile: tuple[int, int]) -> tuple[int, int]:
    (y0, y1), (x0, x1) = grid[0][tile[0]], grid[1][tile[1]]
    return y1 - y0, x1 - x0


def _tile_part_path(work: str | Path, flat: int, tile: tuple[int, int]) -> Path:
    return Path(work) / f"plane_{flat:07d}_tile_{tile[0]:04d}_{tile[1]:04d}.npz"


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
    from .io import ImageSource

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


def _tile_spans(pred, tile: tuple[int, int], grow: int):
    """``(Y, X)`` :class:`~napari_stego.tiling.Span` s of ``tile``: the predictor's own, or
    with ``grow > 0`` its core grown by ``grow`` pixels (clipped to the plane), read with the
    model's halo and aligned to ``pad_to`` like the predictor's own reads (so its feature
    cells are the whole plane's)."""
    from .features import tile_halo
    from .tiling import Span, round_up

    sy, sx = pred.ys[tile[0]], pred.xs[tile[1]]
    if grow <= 0:
        return sy, sx
    model = pred.model
    _, halo = tile_halo(model.tile_config, model.backbone)
    align = model.backbone.spec.pad_to

    def grown(span, n: int):
        c0, c1 = max(0, span.core[0] - grow), min(n, span.core[1] + grow)
        return Span((c0, c1), (max(0, (c0 - halo) // align * align),
                               min(n, round_up(c1 + halo, align))))

    h, w = pred.source.shape2d
    return grown(sy, h), grown(sx, w)


def _crf_halo() -> int:
    from .crf import default_halo

    return default_halo()


def _refine_window(image: np.ndarray, probs: np.ndarray, intensity,
                   origin: tuple[int, int]) -> np.ndarray:
    """Dense CRF of one window of a plane, as :func:`~napari_stego.crf.dense_crf_tiled` runs
    each of its tiles: the reference parameters, the default backend, the bilateral lattice
    in whole-plane coordinates (``origin``: the window's top-left pixel).

    ``image``: raw ``(h, w, C)`` pixels; ``probs``: ``(K, h, w)``. Returns ``(K, h, w)``.
    """
    from .crf import dense_crf

    return dense_crf(image[..., 0] if image.shape[-1] == 1 else image, probs,
                     intensity=intensity, origin=origin)


def _predict_tile(pred, tile: tuple[int, int], window, crf_intensity, settings: _Settings
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels ``(h, w)`` and, when asked, probabilities ``(K, h, w)`` of one tile core.

    Without CRF: ``pred.probs`` of the tile, the chunk ``StegoModel.predict`` computes for it.
    With CRF: the probabilities of ``window`` (the core grown by the CRF halo, see
    :func:`_tile_spans`), refined (:func:`_refine_window`), cropped to the core.
    """
    import copy

    model = pred.model
    if not settings.crf:
        probs = pred.probs(0, *tile)
    else:
        wy, wx = window
        grown = copy.copy(pred)  # the same predictor, on one tile: the grown window
        grown.ys, grown.xs = [wy], [wx]
        probs = grown.probs(0, 0, 0)
        image = pred.source.block(0, slice(*wy.core), slice(*wx.core))
        probs = _refine_window(image, probs, crf_intensity, (wy.core[0], wx.core[0]))
        sy, sx = pred.ys[tile[0]], pred.xs[tile[1]]
        probs = np.ascontiguousarray(probs[:, sy.core[0] - wy.core[0]:sy.core[1] - wy.core[0],
                                           sx.core[0] - wx.core[0]:sx.core[1] - wx.core[0]])
    labels = probs.argmax(0).astype(_label_dtype(model.n_clusters))
    return labels, (probs.astype(np.float32, copy=False) if settings.probabilities else None)


def _run_stats(task: _StatsTask) -> _PlaneResult:
    """Worker side: the intensity mapping of one tiled plane (``fit_intensity`` reads all its
    pixels up to 8 M values, else blocks spread over it), for all its tiles."""
    from .io import fit_intensity

    t0 = time.perf_counter()
    result = _PlaneResult(task.flat, worker=_worker_name())
    try:
        with _PlaneArray(task.input, task.layout, task.flat) as arr:
            source = _plane_source(arr)
            stats = fit_intensity(source, task.intensity)
            crf = None
            if task.crf_intensity is not None:
                crf = stats if task.crf_intensity == task.intensity else \
                    fit_intensity(source, task.crf_intensity)
        result.stats = (stats, crf)
    except Exception as exc:
        result.ok = False
        result.message = _describe(exc, "reading")
    result.seconds = time.perf_counter() - t0
    return result


def _run_tile(task: _TileTask) -> _PlaneResult:
    """Worker side: read one tile core plus its halo, predict it, write its part."""
    from .lazy import TilePredictor

    result, t0 = _start_task(task.flat)
    stage = "reading"
    try:
        with _PlaneArray(task.input, task.layout, task.flat) as arr:
            source = _plane_source(arr)
            stage = "loading the model"
            model = _model_of(task.model)
            pred = TilePredictor(model, source, task.stats[0], model.tile_config,
                                 lock=getattr(model, "_compute_lock", None))
            sy, sx = _tile_spans(pred, task.tile, 0)
            if (sy.core, sx.core) != tuple(task.core):
                raise StegoError(f"tile {task.tile} covers {sy.core} x {sx.core} on this worker, "
                                 f"{task.core[0]} x {task.core[1]} for the job: mixed "
                                 "napari-stego versions?")
            window = _tile_spans(pred, task.tile, _crf_halo() if task.settings.crf else 0)
            stage = "reading"
            arr[slice(*window[0].read), slice(*window[1].read)]  # once; the predictor reuses it
            result.range = _pixel_range(arr[slice(*sy.core), slice(*sx.core)])
            stage = "predicting"
            labels, proba = _predict_tile(pred, task.tile, window, task.stats[1], task.settings)
        result.pixels = int(labels.size)
        stage = "writing"
        _save_tile_part(Path(task.part), labels, proba, result.range)
        result.wrote = True
    except Exception as exc:
        result.ok = False
        result.message = _describe(exc, stage)
    result.seconds = time.perf_counter() - t0
    return result


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
    from .tiling import round_up

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
    if task.settings.format == "zarr":
        def write(tmp: Path) -> None:
            import zarr

            chunks = (1,) * (len(shape) - 2) + _core_shape(grid, (0, 0))
            arr = zarr.create_array(store=str(tmp), shape=tuple(shape), dtype=dtype,
                                    chunks=chunks, zarr_format=3, fill_value=0)
            for flat in range(len(pages) // len(keys)):
                for tile in _grid_tiles(grid):
                    (y0, y1), (x0, x1) = grid[0][tile[0]], grid[1][tile[1]]
                    with np.load(_tile_part_path(work, flat, tile)) as z:
                        for _, j, index in pages[flat * len(keys):(flat + 1) * len(keys)]:
                            arr[index + (slice(y0, y1), slice(x0, x1))] = z[keys[j]]
            arr.attrs[META_KEY] = meta
        return _atomic_write(final, write)
    th, tw = _tiff_tile_side(grid[0], h), _tiff_tile_side(grid[1], w)

    def tiles():
        for flat, j, _ in pages:
            reader = _TileReader(work, flat, grid, keys[j])
            for y in range(0, h, th):
                for x in range(0, w, tw):
                    yield reader.region(y, min(y + th, h), x, min(x + tw, w))
    return _atomic_write(final, _tiff_writer(tiles(), shape, dtype, meta, tile=(th, tw)))


# ============================================================================ schedulers
class _Pool:
    """A ``concurrent.futures`` executor over threads, processes or a dask.distributed
    cluster, and how many tasks it can run at once."""

    def __init__(self, scheduler, workers: int) -> None:
        self.client = None
        self.owns_client = False
        self.local = False
        if scheduler is None or scheduler == "threads":
            self.executor = cf.ThreadPoolExecutor(max_workers=workers,
                                                  thread_name_prefix="napari-stego")
            self.local = True
            self._slots = workers
        elif scheduler == "processes":
            import multiprocessing as mp

            from ._workers import init_worker, silenced

            threads = max(1, (os.cpu_count() or 1) // workers)
            self.executor = cf.ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"),
                initializer=init_worker, initargs=(threads, os.getpid(), silenced()))
            self._slots = workers
        else:
            try:
                from distributed import Client
            except ImportError:
                raise StegoError("a dask scheduler address needs dask.distributed: "
                                 "pip install distributed") from None
            if isinstance(scheduler, Client):
                self.client = scheduler
            elif isinstance(scheduler, str) and (":" in scheduler):
                import dask

                try:
                    self.client = Client(scheduler, timeout=dask.config.get(
                        "distributed.comm.timeouts.connect", "30s"))
                except Exception as exc:
                    raise StegoError(f"cannot reach the dask scheduler at {scheduler} "
                                     f"({_short(exc, 100)})") from None
                self.owns_client = True
            else:
                raise StegoError(f"unknown scheduler {scheduler!r}: use 'threads', 'processes', "
                                 "a dask scheduler address (tcp://host:8786) or a Client")
            self.executor = self.client.get_executor(pure=False)
            self._slots = 0

    @property
    def slots(self) -> int:
        if self.client is None:
            return self._slots
        workers = self.client.scheduler_info().get("workers", {})
        return max(1, sum(w.get("nthreads", 1) for w in workers.values()))

    def submit(self, fn, *args) -> cf.Future:
        return self.executor.submit(fn, *args)

    def close(self, cancel_pending: bool) -> None:
        if self.client is None:
            self.executor.shutdown(wait=True, cancel_futures=cancel_pending)
        elif self.owns_client:
            self.client.close()


# ============================================================================ segment
@dataclass
class _FileJob:
    result: FileResult
    layout: _Layout | None = None
    labels_out: Path | None = None
    proba_out: Path | None = None
    meta: dict = field(default_factory=dict)
    work: Path | None = None
    todo: list[int] = field(default_factory=list)
    pending: int = 0          # planes submitted or queued, not yet finished
    blank: dict = field(default_factory=dict)
    assembling: bool = False
    done: bool = False
    grid: _Grid | None = None  # the tile cores of tiled planes (None: planes predicted whole)
    tiles: dict = field(default_factory=dict)   # tiled plane -> its tiles still to predict
    left: dict = field(default_factory=dict)    # tiled plane -> its tiles not finished yet
    ranges: dict = field(default_factory=dict)  # tiled plane -> pixel range of its tiles


def _input_signature(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def segment_files(model, inputs, out: str | os.PathLike, *, crf: bool = False,
                  probabilities: bool = False, format: str = "tif", overwrite: bool = False,
                  scheduler=None, workers: int = 1, weights: str | os.PathLike | None = None,
                  device: str | None = None, progress: Progress | None = None,
                  log: Log | None = None, cancel=None) -> BatchReport:
    """Segment many TIFF files (and every plane of each stack) with one model.

    Writes one labels file per input into ``out`` with the input's base name
    (``cells_01.ome.tif`` -> ``out/cells_01.tif``), the same spatial shape and the input's
    leading axes, uint8 (uint16 for more than 256 clusters), with JSON metadata recording
    the model (path, SHA-256, backbone, K), the settings, the input's signature and the
    package version. Re-running skips finished outputs; see the module docstring.

    Args:
        model: a ``.stego`` file or a :class:`~napari_stego.model.StegoModel`.
        inputs: files, globs (``"data/**/*.tif"``) and folders, or one of them.
        out: the output folder (created).
        crf: refine with the dense CRF before the argmax.
        probabilities: also write ``<name>_proba.tif`` with float32 ``(..., K, H, W)``
            cluster probabilities.
        format: ``"tif"`` (zlib-compressed TIFF) or ``"zarr"`` (a ``<name>.zarr`` folder).
        overwrite: recompute and replace outputs that exist (default: keep finished ones).
        scheduler: ``"threads"`` (default: in this process), ``"processes"`` (local
            worker processes), a dask.distributed scheduler address (``"tcp://host:8786"``)
            or a ``distributed.Client``. Workers must see ``inputs``, ``out`` and the model
            file under the same paths (a shared file system).
        workers: threads / processes for the local schedulers (ignored for dask).
        weights: the backbone weights file, on machines where the one recorded in the
            model is not present.
        device: ``"auto"``/``None`` (CUDA > MPS > CPU, per worker) or a device name.
        progress: ``progress("segment", planes_done, planes_total)``; when some planes are
            bigger than one tile of the model's ``TileConfig`` (they are predicted tile by
            tile, see the module docstring) also ``progress("tiles", done, total)``.
        log: receives one line per problem or notice (failed / skipped inputs, stale
            outputs recomputed).
        cancel: anything with ``is_set()``; running planes (tiles) finish, the rest is
            dropped.

    Returns:
        A :class:`BatchReport`; ``report.exit_code`` is 0 when every input has its output.

    Raises:
        StegoError: the job cannot start (unreadable or incompatible model, bad ``format``
            or ``scheduler``, output folder not writable). Problems with single inputs do
            not raise: they are reported and the other inputs go on.
        Cancelled: ``cancel`` was set.
    """
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    if format not in FORMATS:
        raise StegoError(f"unknown output format {format!r}: use one of {', '.join(FORMATS)}")
    if not isinstance(workers, int) or workers < 1:
        raise StegoError(f"workers must be a positive integer, got {workers!r}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StegoError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    files, problems = expand_inputs(inputs)
    if not files and not problems:
        raise StegoError("no inputs given: pass files, globs or folders of TIFFs")
    for p in problems:
        say(f"failed: {p.line()}")

    settings = _Settings(crf=bool(crf), probabilities=bool(probabilities), format=format)
    pool = _Pool(scheduler, workers)
    cancelled, temporary, ref = True, None, None
    try:
        ref, loaded, shown, temporary = _prepare_model(model, out, weights, device, pool.local)
        jobs = _plan(files, out, ref, shown, loaded, settings, overwrite, say)
        report = BatchReport([*problems, *(j.result for j in jobs)], str(out))
        busy = [j for j in jobs if not j.done]
        total = sum(j.layout.n_planes for j in busy)
        planes = _Tally("segment", progress, total - sum(len(j.todo) for j in busy), total)
        planes.report()
        total = sum(j.layout.n_planes * len(_grid_tiles(j.grid)) for j in busy if j.grid)
        tiles = _Tally("tiles", progress, total - sum(len(t) for j in busy
                                                      for t in j.tiles.values()), total)
        if total:
            tiles.report()
        with _local_dask(pool):
            cancelled = _dispatch(pool, jobs, ref, loaded, settings, report, say, cancel,
                                  planes, tiles)
    finally:
        pool.close(cancel_pending=cancelled)
        if temporary is not None:  # a model object's transport file, and its cache entry
            _remove(temporary)
            with _MODELS_LOCK:
                _MODELS.pop(ref.key, None)
    if cancelled:
        raise Cancelled("segmentation cancelled; finished files are kept, re-run to resume")
    report.seconds = time.perf_counter() - t_start
    with contextlib.suppress(OSError):
        (out / WORK_DIR).rmdir()  # only when empty
    return report


def _local_dask(pool: _Pool):
    """With an in-process pool, dask work inside the planes uses local threads even when a
    distributed ``Client`` exists in this process (it would otherwise get the graphs)."""
    if not pool.local:
        return contextlib.nullcontext()
    import dask

    return dask.config.set(scheduler="threads")


def _plan(files: Sequence[Path], out: Path, ref: _ModelRef, shown: str, model,
          settings: _Settings, overwrite: bool, say: Log) -> list[_FileJob]:
    """Per input: its layout, its outputs and the planes still to compute."""
    jobs: list[_FileJob] = []
    ext = ".zarr" if settings.format == "zarr" else ".tif"
    claimed: dict[Path, str] = {}
    model_meta = model.metadata()
    inputs_resolved = {f.resolve() for f in files}
    for path in files:
        job = _FileJob(FileResult(str(path), "pending"))
        jobs.append(job)
        name = _base_name(path)
        labels_out = out / f"{name}{ext}"
        proba_out = out / f"{name}_proba{ext}" if settings.probabilities else None
        if labels_out.resolve() in inputs_resolved or (
                proba_out is not None and proba_out.resolve() in inputs_resolved):
            _fail(job, f"its output {labels_out} would replace an input: choose another --out",
                  say)
            continue
        if labels_out in claimed:
            _fail(job, f"same base name as {claimed[labels_out]}: segment one of them into "
                       "another --out folder", say)
            continue
        claimed[labels_out] = str(path)
        try:
            layout = _inspect(path)
            signature = _input_signature(path)
        except StegoError as exc:
            _fail(job, str(exc), say)
            continue
        job.layout, job.labels_out, job.proba_out = layout, labels_out, proba_out
        job.meta = {
            "written_by": "napari-stego segment",
            "package_version": __version__,
            "complete": True,
            "layer_name": f"{name} labels",
            "model": {"path": shown, "sha256": ref.sha256, "backbone": model_meta["backbone"],
                      "n_clusters": model.n_clusters,
                      "weights_fingerprint": model_meta["weights_fingerprint"],
                      "package_version": model_meta["package_version"]},
            "settings": {"crf": settings.crf},
            "input": {"path": str(path.resolve()), "signature": signature,
                      "shape": list(layout.shape), "axes": layout.axes, "dtype": layout.dtype},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        job.result.planes = layout.n_planes
        job.result.outputs = [str(p) for p in (labels_out, proba_out) if p is not None]
        for final in (labels_out, proba_out):
            if final is not None:
                _clean_partials(final)
        states = []
        for final, kind in ((labels_out, "labels"), (proba_out, "probabilities")):
            if final is None:
                continue
            expected = dict(job.meta, kind=kind)
            if kind == "labels":
                expected.update(shape=list(layout.out_shape),
                                dtype=_label_dtype(model.n_clusters).str)
            else:
                s = layout.out_shape
                expected.update(shape=[*s[:-2], model.n_clusters, *s[-2:]], dtype="<f4")
            states.append(check_output(final, expected, settings.format, overwrite))
        if all(s == VALID for s, _ in states):
            job.result.status = "existing"
            job.done = True
            continue
        blocked = [reason for s, reason in states if s == BLOCKED]
        if blocked:
            _fail(job, blocked[0], say)
            continue
        for s, reason in states:
            if s == REDO and reason:
                say(f"recomputing {path}: {reason}")
                break
        job.todo = list(range(layout.n_planes))
        job.grid = _plane_grid(model, layout.plane_shape)
        if layout.n_planes > 1 or job.grid is not None:
            job.work = out / WORK_DIR / name
            _resume_parts(job, ref, settings, overwrite, model.n_clusters)
    return jobs


def _resume_parts(job: _FileJob, ref: _ModelRef, settings: _Settings, overwrite: bool,
                  n_clusters: int) -> None:
    """Reuse the plane (and tile) parts a killed job left, when they were made the same
    way; set ``job.todo`` to the planes with work left (and ``job.tiles`` to their tiles)."""
    stamp = {"model": ref.sha256, "settings": asdict(settings),
             "input": job.meta["input"], "n_clusters": n_clusters, "grid": job.grid}
    stamp_file = job.work / "job.json"
    old = None
    if not overwrite and stamp_file.is_file():
        with contextlib.suppress(Exception):
            old = json.loads(stamp_file.read_text())
    fresh = old != json.loads(json.dumps(stamp))
    if fresh:
        shutil.rmtree(job.work, ignore_errors=True)
        job.work.mkdir(parents=True, exist_ok=True)
        _atomic_write(stamp_file, lambda tmp: tmp.write_text(json.dumps(stamp)))
    todo = []
    for flat in job.todo:
        if job.grid is not None:
            missing = []
            for tile in _grid_tiles(job.grid):
                part = _tile_part_path(job.work, flat, tile)
                rng = None
                if not fresh:
                    _clean_partials(part)
                    rng = _tile_part_range(part, _core_shape(job.grid, tile),
                                           n_clusters if settings.probabilities else 0)
                if rng is None:
                    missing.append(tile)
                else:
                    job.ranges[flat] = _merge_ranges(job.ranges.get(flat), rng)
            if missing:
                job.tiles[flat], job.left[flat] = missing, len(missing)
                todo.append(flat)
            else:
                reason = _range_reason(job.ranges.get(flat))
                if reason:
                    job.blank[flat] = reason
            continue
        part = _part_path(job, flat)
        if fresh:
            todo.append(flat)
            continue
        _clean_partials(part)
        if _part_ok(part, job.layout.plane_shape, settings.probabilities):
            with np.load(part) as z:
                reason = str(z["blank"])
            if reason:
                job.blank[flat] = reason
        else:
            todo.append(flat)
    job.todo = todo


def _part_path(job: _FileJob, flat: int) -> Path:
    return job.work / f"plane_{flat:07d}.npz"


def _fail(job: _FileJob, message: str, say: Log) -> None:
    job.result.status, job.result.message, job.done = "failed", message, True
    say(f"failed: {job.result.line()}")


class _Tally:
    """``done`` / ``total`` of one progress stage, reported on every change."""

    def __init__(self, stage: str, progress: Progress | None, done: int, total: int) -> None:
        self.stage, self.progress, self.done, self.total = stage, progress, done, total

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)

    def add(self, n: int = 1) -> None:
        self.done += n
        self.report()

    def drop(self, n: int = 1) -> None:
        """``n`` units that will not run (their file failed)."""
        if n:
            self.total -= n
            self.report()


@dataclass
class _Item:
    """One task of the dispatcher: ``kind`` is ``"plane"`` (a plane predicted whole),
    ``"stats"`` or ``"tile"`` (of a tiled plane), or ``"assemble"`` (a file's output)."""

    kind: str
    job: _FileJob
    flat: int = -1
    tile: tuple[int, int] | None = None
    stats: tuple | None = None


def _dispatch(pool: _Pool, jobs: list[_FileJob], ref: _ModelRef, model, settings: _Settings,
              report: BatchReport, say: Log, cancel, planes: _Tally, tiles: _Tally) -> bool:
    """Run every job's planes or tiles (then its assembly) on the pool; True if cancelled.

    A tiled plane runs as a statistics task, then (when it is back) one task per tile; the
    tiles of a plane are queued next, so a plane's parts are finished before the next
    plane's start. At most about two tasks per worker thread are in flight.
    """
    queue: list[_Item] = []
    for j in jobs:
        if not j.done:
            queue += [_Item("plane" if j.grid is None else "stats", j, f) for f in j.todo]
            j.pending = len(j.todo)
    queue.reverse()  # pop() from the end = file order
    running: dict[cf.Future, _Item] = {}
    workers: set[str] = set()
    intensity = model.feature_config.intensity
    crf_intensity = None
    if settings.crf:
        from .crf import CRFConfig

        crf_intensity = CRFConfig().intensity

    def submit(item: _Item) -> None:
        job = item.job
        if item.kind == "stats":
            task = _StatsTask(job.result.input, job.layout, item.flat, intensity, crf_intensity)
            running[pool.submit(_run_stats, task)] = item
        elif item.kind == "tile":
            iy, ix = item.tile
            task = _TileTask(ref, settings, job.result.input, job.layout, item.flat, item.tile,
                             (job.grid[0][iy], job.grid[1][ix]), item.stats,
                             str(_tile_part_path(job.work, item.flat, item.tile)))
            running[pool.submit(_run_tile, task)] = item
        else:
            if job.layout.n_planes == 1:  # write the outputs straight away
                where = dict(labels_out=str(job.labels_out),
                             meta=dict(job.meta, blank_planes=[]),
                             proba_out=None if job.proba_out is None else str(job.proba_out))
            else:
                where = dict(part=str(_part_path(job, item.flat)))
            task = _PlaneTask(ref, settings, job.result.input, job.layout, item.flat, **where)
            running[pool.submit(_run_plane, task)] = item

    def submit_assemble(job: _FileJob) -> None:
        if job.result.status == "failed":
            return
        job.assembling = True
        if len(job.blank) == job.layout.n_planes:
            _skip(job, next(iter(job.blank.values())), say)
            shutil.rmtree(job.work, ignore_errors=True)
            return
        parts = () if job.grid is not None else tuple(
            str(_part_path(job, i)) for i in range(job.layout.n_planes))
        task = _AssembleTask(settings, job.layout, model.n_clusters, parts,
                             str(job.labels_out), None if job.proba_out is None
                             else str(job.proba_out), dict(job.meta,
                                                           blank_planes=sorted(job.blank)),
                             str(job.work), job.grid)
        running[pool.submit(_run_assemble, task)] = _Item("assemble", job)

    def tile_over(job: _FileJob, flat: int) -> None:
        """One tile of plane ``flat`` finished or dropped; the plane is done after its last."""
        job.left[flat] -= 1
        if job.left[flat] > 0:
            return
        if job.done:  # its file failed: the plane will not be written
            planes.drop()
            return
        planes.add()
        reason = _range_reason(job.ranges.get(flat))
        if reason:
            job.blank[flat] = reason
        job.pending -= 1
        if job.pending == 0:
            submit_assemble(job)

    def drop(item: _Item) -> None:
        """An item of a file that failed already: it will not run."""
        if item.kind == "plane":
            planes.drop()
        elif item.kind == "stats":
            planes.drop()
            tiles.drop(len(item.job.tiles[item.flat]))
        elif item.kind == "tile":
            tiles.drop()
            tile_over(item.job, item.flat)

    for j in jobs:
        if not j.done and not j.todo:
            submit_assemble(j)

    while queue or running:
        if cancel is not None and cancel.is_set():
            for f in running:
                f.cancel()
            return True
        limit = 2 * pool.slots + 2
        while queue and len(running) < limit:
            item = queue.pop()
            if item.job.done:  # its file failed already: this will not run
                drop(item)
                continue
            submit(item)
        if not running:
            continue
        finished, _ = cf.wait(list(running), timeout=0.25, return_when=cf.FIRST_COMPLETED)
        for fut in finished:
            item = running.pop(fut)
            job, flat = item.job, item.flat
            try:
                res: _PlaneResult = fut.result()
            except cf.CancelledError:
                continue
            except Exception as exc:  # the worker died (e.g. killed for memory)
                res = _PlaneResult(flat, ok=False, message=_describe(exc, "on the worker"))
            if res.worker:
                workers.add(res.worker)
            job.result.seconds += res.seconds
            if item.kind == "assemble":
                job.done = True
                if res.ok:
                    job.result.status = "written"
                    if job.blank:
                        say(f"note: {job.result.input}: {len(job.blank)} of "
                            f"{job.layout.n_planes} planes are blank (all NaN or constant); "
                            "their labels are what the model makes of an empty field")
                else:
                    _fail(job, res.message, say)
                continue
            if item.kind == "stats":
                if not job.done and not res.ok:
                    _fail(job, res.message, say)
                if job.done:
                    drop(item)
                    continue
                queue.extend(reversed([_Item("tile", job, flat, t, res.stats)
                                       for t in job.tiles[flat]]))
                continue
            if item.kind == "tile":
                tiles.add()
                if not job.done:
                    if res.ok:
                        job.result.pixels += res.pixels
                        job.ranges[flat] = _merge_ranges(job.ranges.get(flat), res.range)
                    else:
                        _fail(job, res.message, say)
                tile_over(job, flat)
                continue
            planes.add()
            if job.done:
                continue
            if not res.ok:
                _fail(job, res.message, say)
                continue
            job.result.pixels += res.pixels
            if res.blank is not None:
                job.blank[flat] = res.blank
            if job.layout.n_planes == 1:
                job.done = True
                if res.wrote:
                    job.result.status = "written"
                else:
                    _skip(job, res.blank or "nothing to segment", say)
                continue
            job.pending -= 1
            if job.pending == 0:
                submit_assemble(job)
    report.workers = sorted(workers)
    return False


def _skip(job: _FileJob, reason: str, say: Log) -> None:
    job.result.status, job.done = "skipped", True
    job.result.message = f"{reason}: nothing to segment, no output written"
    job.result.outputs = []
    say(f"skipped: {job.result.line()}")


# ============================================================================ fit
def fit_files(inputs, out: str | os.PathLike, *, n_clusters: int,
              backbone: str = "dino_vits8", weights: str | os.PathLike | None = None,
              steps: int | None = None, device: str | None = None, seed: int = 0,
              upsample: int = 1, progress: Progress | None = None, log: Log | None = None,
              cancel=None) -> FitReport:
    """Fit a model on every plane of the given TIFF files and save it to ``out``.

    ``upsample`` runs the backbone on images up-sampled by that factor
    (:attr:`~napari_stego.features.FeatureConfig.upsample`), for thin structures.

    Unreadable, unsupported and blank (all-NaN / constant) inputs are left out with a
    one-line message; the fit uses the rest.

    Raises:
        StegoError: no usable image, or what :meth:`StegoModel.fit` raises.
        Cancelled: ``cancel`` was set.
    """
    from .model import StegoModel

    say = log or (lambda msg: None)
    check_model_out(Path(out))  # before the work, not after it
    files, problems = expand_inputs(inputs)
    for p in problems:
        say(f"failed: {p.line()}")
    images: list[np.ndarray] = []
    results = list(problems)
    for path in files:
        try:
            planes = read_planes(path)
        except StegoError as exc:
            results.append(FileResult(str(path), "failed", str(exc)))
            say(f"failed: {results[-1].line()}")
            continue
        usable = [p for p in planes if _blank_reason(p) is None]
        if not usable:
            results.append(FileResult(str(path), "skipped",
                                      f"{_blank_reason(planes[0])}: nothing to learn from"))
            say(f"skipped: {results[-1].line()}")
            continue
        images.extend(usable)
        results.append(FileResult(str(path), "used", planes=len(usable),
                                  pixels=sum(p.shape[0] * p.shape[1] for p in usable)))
    if not images:
        raise StegoError("no usable images to fit on: " + (
            "; ".join(r.line() for r in results) or "no inputs given"))
    out = Path(out)
    from .features import FeatureConfig

    model = StegoModel.fit(images, n_clusters, backbone=backbone, weights=weights, steps=steps,
                           device=device, seed=seed, features=FeatureConfig(upsample=upsample),
                           progress=progress, cancel=cancel)
    model.info["fitted_on"] = [r.input for r in results if r.status == "used"]
    try:
        path = model.save(out)
    except Exception as exc:  # OSError, or safetensors' own error for the same causes
        remove_model_partials(out)
        raise StegoError(f"cannot write the model to {out}: "
                         f"{_short(getattr(exc, 'strerror', None) or exc)}") from None
    return FitReport(str(path), results, len(images), list(model.info.get("warnings", [])))


# ============================================================================ evaluate
def _read_labels(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".zarr":
        import zarr

        return np.asarray(zarr.open_array(str(path), mode="r")[...])
    if _is_tiff(path):
        import tifffile

        return tifffile.imread(str(path))
    from skimage.io import imread

    return imread(str(path))


def _label_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.lower().endswith(suffixes):
            continue
        stem = _base_name(p) if _is_tiff(p) else p.name.rsplit(".", 1)[0]
        if stem.endswith("_proba"):
            continue
        found.setdefault(stem, p)
    return found


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *,
                     n_classes: int | None = None, ignore_index: int = 255,
                     out: str | os.PathLike | None = None, log: Log | None = None) -> dict:
    """Score predicted cluster maps against ground-truth class maps, matched by base name.

    All matched pairs are pooled into one confusion matrix; clusters are matched to classes
    one-to-one (Hungarian) as in :func:`napari_stego.metrics.hungarian_scores`.

    Writes ``evaluation.json`` (mIoU, accuracy, per-class IoU, assignment, confusion
    matrix, class names when the ground truth folder gives them, per-file scores, unmatched
    files) and ``confusion.png`` (:func:`napari_stego.figures.confusion_figure`: rows the
    true classes, columns the matched clusters, percentages of each row) into ``out``
    (default ``pred_dir``). Returns the JSON content plus its paths.

    Raises:
        StegoError: a folder is missing, or no prediction has a ground truth of its name.
    """
    from .figures import find_class_names
    from .metrics import confusion_matrix, hungarian_scores

    say = log or (lambda msg: None)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise StegoError(f"{what} folder {d} does not exist")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise StegoError(f"--out {out} is a file: evaluate writes evaluation.json and "
                         "confusion.png into a folder")
    preds = _label_files(pred_dir, (*TIFF_SUFFIXES, ".zarr"))
    gts = _label_files(gt_dir, (*TIFF_SUFFIXES, ".png"))
    pairs = [(k, preds[k], gts[k]) for k in preds if k in gts]
    if not pairs:
        raise StegoError(f"no prediction in {pred_dir} has a ground truth of the same base "
                         f"name in {gt_dir}")
    problems = [f"{preds[k]}: no ground truth named {k}.* in {gt_dir}" for k in preds
                if k not in gts]
    problems += [f"{gts[k]}: no prediction named {k}.* in {pred_dir}" for k in gts
                 if k not in preds]
    loaded = []
    for key, p, g in pairs:
        try:
            pred, gt = _read_labels(p).astype(np.int64), _read_labels(g)
        except Exception as exc:
            problems.append(f"{p}: cannot read ({_short(exc, 100)})")
            continue
        if gt.ndim == pred.ndim + 1 and gt.shape[-1] in (3, 4):
            problems.append(f"{g}: ground truth is RGB; class maps must be integer images")
            continue
        if pred.shape != gt.shape:
            problems.append(f"{p}: shape {pred.shape} differs from its ground truth {gt.shape}")
            continue
        bad = _class_map_problem(gt, ignore_index)
        if bad:
            problems.append(f"{g}: {bad}")
            continue
        loaded.append((key, p, g, pred, gt.astype(np.int64)))
    for msg in problems:
        say(f"warning: {msg}")
    if not loaded:
        raise StegoError("no prediction could be compared with its ground truth: "
                         + "; ".join(problems))
    n_clusters = max(int(pred.max()) + 1 for *_, pred, _ in loaded)
    if n_classes is None:
        tops = [int(gt[(gt != ignore_index) & (gt >= 0)].max(initial=-1)) for *_, gt in loaded]
        n_classes = max(tops) + 1
    if n_classes < 1:
        raise StegoError("the ground truth holds no class ids (only ignore_index)")
    top = max(int(gt[gt != ignore_index].max(initial=-1)) for *_, gt in loaded)
    if top >= n_classes:
        raise StegoError(f"the ground truth holds class ids up to {top}, but n_classes "
                         f"(--n-classes) is {n_classes}: pass at least {top + 1}, or leave it "
                         "out to count the classes")
    conf = np.zeros((n_clusters, n_classes), np.int64)
    per_file = []
    for key, p, g, pred, gt in loaded:
        c = confusion_matrix(pred, gt, n_clusters, n_classes, ignore_index)
        conf += c
        s = hungarian_scores(c)
        per_file.append({"name": key, "prediction": str(p), "ground_truth": str(g),
                         "pixels": int(c.sum()), "miou": _num(s["miou"]),
                         "accuracy": _num(s["accuracy"])})
    scores = hungarian_scores(conf)
    out = Path(out) if out is not None else pred_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StegoError(f"cannot create the folder {out}: {exc.strerror or exc}") from None
    result = {
        "miou": _num(scores["miou"]), "accuracy": _num(scores["accuracy"]),
        "iou_per_class": [_num(v) for v in scores["iou_per_class"]],
        "assignment": [int(a) for a in scores["assignment"]],
        "n_clusters": n_clusters, "n_classes": n_classes, "ignore_index": ignore_index,
        "class_names": find_class_names(gt_dir, n_classes),
        "confusion": conf.tolist(), "files": per_file, "problems": problems,
        "package_version": __version__,
    }
    json_path, png_path = out / "evaluation.json", out / "confusion.png"
    _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    from .figures import confusion_figure

    title = (f"mIoU {result['miou']:.1f} %, accuracy {result['accuracy']:.1f} % over "
             f"{len(per_file)} files" if result["miou"] is not None else "")
    _atomic_write(png_path, lambda tmp: confusion_figure(
        conf, scores["assignment"], tmp, class_names=result["class_names"], title=title))
    return dict(result, json=str(json_path), png=str(png_path))


def _class_map_problem(gt: np.ndarray, ignore_index: int) -> str | None:
    """Why ``gt`` is not a map of class ids (non-integer or negative values), or ``None``."""
    if gt.dtype.kind not in "biuf":
        return f"ground truth of dtype {gt.dtype}: class maps must be integer images"
    if gt.dtype.kind == "f" and not (np.isfinite(gt).all() and (gt == np.round(gt)).all()):
        return (f"ground truth holds non-integer values ({gt.dtype}): class maps must hold "
                "integer class ids")
    low = gt[gt != ignore_index].min(initial=0)
    if low < 0:
        return (f"ground truth holds negative class ids (down to {low:g}): class ids start "
                "at 0; mark pixels to leave out with the ignore index (--ignore-index)")
    return None


def _num(v) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 4)
