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
3. *Writes are atomic*: every file (parts included) is written under a hidden temporary
   name in the same folder and renamed when complete; a killed job never leaves a
   half-written output under the output's name, and inputs are only ever read.

Models are loaded once per worker process (:func:`cached_model`, keyed by the model
file's SHA-256, device and weights), not once per plane.

Tiled prediction of a single huge plane is not here yet: a plane is predicted whole.
``_predict_plane`` is the one place a lazy/tiled predictor plugs in.
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

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

META_KEY = "napari_stego"
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


def _tiff_writer(data: np.ndarray | Iterable[np.ndarray], shape, dtype, meta: dict):
    def write(tmp: Path) -> None:
        import tifffile

        tifffile.imwrite(str(tmp), data, shape=tuple(shape), dtype=dtype, compression="zlib",
                         photometric="minisblack", metadata={META_KEY: json.dumps(meta)})
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
def _read_meta_tiff(path: Path) -> tuple[dict | None, tuple, np.dtype]:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        meta = None
        shaped = tif.shaped_metadata
        if shaped and isinstance(shaped[0], dict) and META_KEY in shaped[0]:
            raw = shaped[0][META_KEY]
            meta = json.loads(raw) if isinstance(raw, str) else dict(raw)
        tif.pages[len(tif.pages) - 1].asarray()  # the last plane decodes: not truncated
    return meta, shape, dtype


def _read_meta_zarr(path: Path) -> tuple[dict | None, tuple, np.dtype]:
    import zarr

    arr = zarr.open_array(str(path), mode="r")
    meta = arr.attrs.get(META_KEY)
    if arr.ndim:
        np.asarray(arr[tuple(s - 1 for s in arr.shape)])  # the last chunk reads
    return (dict(meta) if meta is not None else None), tuple(arr.shape), np.dtype(arr.dtype)


def _check_output(path: Path, expected: dict, fmt: str) -> tuple[str, str]:
    """``(state, reason)``: ``"missing"``, ``"valid"``, ``"redo"`` (stale or damaged: recompute)
    or ``"keep"`` (someone else's file, or another model's: only ``overwrite`` replaces it)."""
    if not path.exists():
        return "missing", ""
    try:
        meta, shape, dtype = (_read_meta_zarr if fmt == "zarr" else _read_meta_tiff)(path)
    except Exception as exc:
        return "redo", f"existing output is unreadable ({_short(exc, 80)})"
    if meta is None or meta.get("written_by") != "napari-stego segment":
        return "keep", f"{path} exists and was not written by napari-stego segment"
    theirs = meta.get("model", {}).get("sha256"), meta.get("settings")
    ours = expected["model"]["sha256"], expected["settings"]
    if theirs != ours:
        return "keep", f"{path} exists, made with another model or settings"
    if meta.get("input", {}).get("signature") != expected["input"]["signature"]:
        return "redo", "input changed since its output was written"
    if tuple(shape) != tuple(expected["shape"]) or dtype != np.dtype(expected["dtype"]):
        return "redo", (f"existing output has shape {tuple(shape)} {dtype}, expected "
                        f"{tuple(expected['shape'])} {np.dtype(expected['dtype'])}")
    if not meta.get("complete"):
        return "redo", "existing output is incomplete"
    return "valid", ""


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


def _run_plane(task: _PlaneTask) -> _PlaneResult:
    """Worker side: read one plane, predict it, write it. Never raises for bad data."""
    if _on_dask_worker():
        _pin_worker_dask()
    t0 = time.perf_counter()
    result = _PlaneResult(task.flat, worker=_worker_name())
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
        _write_output(Path(task.labels_out), planes("labels"), shape, dtype, meta, fmt)
        if task.proba_out is not None:
            pshape = (*shape[:-2], task.n_clusters, *shape[-2:])
            _write_output(Path(task.proba_out), planes("proba"), pshape, np.float32,
                          dict(meta, kind="probabilities", shape=list(pshape), dtype="float32"),
                          fmt, plane_ndim=3)
        shutil.rmtree(task.work, ignore_errors=True)
        result.wrote = True
    except Exception as exc:
        result.ok = False
        result.message = _describe(exc, "writing")
    result.seconds = time.perf_counter() - t0
    return result


# ============================================================================ schedulers
def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


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

            threads = max(1, (os.cpu_count() or 1) // workers)
            self.executor = cf.ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"),
                initializer=_set_torch_threads, initargs=(threads,))
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
        progress: ``progress("segment", planes_done, planes_total)``.
        log: receives one line per problem or notice (failed / skipped inputs, stale
            outputs recomputed).
        cancel: anything with ``is_set()``; running planes finish, the rest is dropped.

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
        done_planes = total - sum(len(j.todo) for j in busy)
        if progress is not None:
            progress("segment", done_planes, total)
        with _local_dask(pool):
            cancelled = _dispatch(pool, jobs, ref, loaded, settings, report, progress, say,
                                  cancel, done_planes, total)
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
        if not overwrite:
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
                states.append(_check_output(final, expected, settings.format))
            if all(s == "valid" for s, _ in states):
                job.result.status = "existing"
                job.done = True
                continue
            keep = [reason for s, reason in states if s == "keep"]
            if keep:
                _fail(job, f"{keep[0]}: pass overwrite (--overwrite) to replace it, or "
                           "choose another output folder", say)
                continue
            for s, reason in states:
                if s == "redo":
                    say(f"recomputing {path}: {reason}")
                    break
        job.todo = list(range(layout.n_planes))
        if layout.n_planes > 1:
            job.work = out / WORK_DIR / name
            _resume_parts(job, ref, settings, overwrite, model.n_clusters)
    return jobs


def _resume_parts(job: _FileJob, ref: _ModelRef, settings: _Settings, overwrite: bool,
                  n_clusters: int) -> None:
    """Reuse the plane parts a killed job left, when they were made the same way."""
    stamp = {"model": ref.sha256, "settings": asdict(settings),
             "input": job.meta["input"], "n_clusters": n_clusters}
    stamp_file = job.work / "job.json"
    old = None
    if not overwrite and stamp_file.is_file():
        with contextlib.suppress(Exception):
            old = json.loads(stamp_file.read_text())
    if old != json.loads(json.dumps(stamp)):
        shutil.rmtree(job.work, ignore_errors=True)
        job.work.mkdir(parents=True, exist_ok=True)
        _atomic_write(stamp_file, lambda tmp: tmp.write_text(json.dumps(stamp)))
        return
    todo = []
    for flat in job.todo:
        part = _part_path(job, flat)
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


def _dispatch(pool: _Pool, jobs: list[_FileJob], ref: _ModelRef, model, settings: _Settings,
              report: BatchReport, progress: Progress | None, say: Log, cancel,
              done_planes: int, total: int) -> bool:
    """Run every job's planes (then its assembly) on the pool; returns True if cancelled."""
    queue: list[tuple[_FileJob, int]] = [(j, f) for j in jobs if not j.done for f in j.todo]
    queue.reverse()  # pop() from the end = file order
    for j in jobs:
        if not j.done:
            j.pending = len(j.todo)
    running: dict[cf.Future, tuple[_FileJob, int]] = {}
    workers: set[str] = set()

    def submit_assemble(job: _FileJob) -> None:
        if job.result.status == "failed":
            return
        job.assembling = True
        if len(job.blank) == job.layout.n_planes:
            _skip(job, next(iter(job.blank.values())), say)
            shutil.rmtree(job.work, ignore_errors=True)
            return
        task = _AssembleTask(settings, job.layout, model.n_clusters,
                             tuple(str(_part_path(job, i)) for i in range(job.layout.n_planes)),
                             str(job.labels_out), None if job.proba_out is None
                             else str(job.proba_out), dict(job.meta,
                                                           blank_planes=sorted(job.blank)),
                             str(job.work))
        running[pool.submit(_run_assemble, task)] = (job, -1)

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
            job, flat = queue.pop()
            if job.done:  # its file failed already: this plane will not run
                total -= 1
                if progress is not None:
                    progress("segment", done_planes, total)
                continue
            if job.layout.n_planes == 1:  # write the outputs straight away
                where = dict(labels_out=str(job.labels_out), meta=dict(job.meta, blank_planes=[]),
                             proba_out=None if job.proba_out is None else str(job.proba_out))
            else:
                where = dict(part=str(_part_path(job, flat)))
            task = _PlaneTask(ref, settings, job.result.input, job.layout, flat, **where)
            running[pool.submit(_run_plane, task)] = (job, flat)
        if not running:
            continue
        finished, _ = cf.wait(list(running), timeout=0.25, return_when=cf.FIRST_COMPLETED)
        for fut in finished:
            job, flat = running.pop(fut)
            try:
                res: _PlaneResult = fut.result()
            except cf.CancelledError:
                continue
            except Exception as exc:  # the worker died (e.g. killed for memory)
                res = _PlaneResult(flat, ok=False, message=_describe(exc, "on the worker"))
            if res.worker:
                workers.add(res.worker)
            job.result.seconds += res.seconds
            if flat == -1:  # an assembly
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
            done_planes += 1
            if progress is not None:
                progress("segment", done_planes, total)
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
              progress: Progress | None = None, log: Log | None = None,
              cancel=None) -> FitReport:
    """Fit a model on every plane of the given TIFF files and save it to ``out``.

    Unreadable, unsupported and blank (all-NaN / constant) inputs are left out with a
    one-line message; the fit uses the rest.

    Raises:
        StegoError: no usable image, or what :meth:`StegoModel.fit` raises.
        Cancelled: ``cancel`` was set.
    """
    from .model import StegoModel

    say = log or (lambda msg: None)
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
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    model = StegoModel.fit(images, n_clusters, backbone=backbone, weights=weights, steps=steps,
                           device=device, seed=seed, progress=progress, cancel=cancel)
    model.info["fitted_on"] = [r.input for r in results if r.status == "used"]
    path = model.save(out)
    return FitReport(str(path), results, len(images))


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
    matrix, per-file scores, unmatched files) and ``confusion.png`` (rows: true classes,
    columns: the matched clusters, each row normalised) into ``out`` (default
    ``pred_dir``). Returns the JSON content plus its paths.

    Raises:
        StegoError: a folder is missing, or no prediction has a ground truth of its name.
    """
    from .metrics import confusion_matrix, hungarian_scores

    say = log or (lambda msg: None)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise StegoError(f"{what} folder {d} does not exist")
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
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "miou": _num(scores["miou"]), "accuracy": _num(scores["accuracy"]),
        "iou_per_class": [_num(v) for v in scores["iou_per_class"]],
        "assignment": [int(a) for a in scores["assignment"]],
        "n_clusters": n_clusters, "n_classes": n_classes, "ignore_index": ignore_index,
        "confusion": conf.tolist(), "files": per_file, "problems": problems,
        "package_version": __version__,
    }
    json_path, png_path = out / "evaluation.json", out / "confusion.png"
    _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    _atomic_write(png_path, lambda tmp: _confusion_png(conf, scores["assignment"], tmp))
    return dict(result, json=str(json_path), png=str(png_path))


def _num(v) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 4)


def _confusion_png(conf: np.ndarray, assignment: np.ndarray, path: Path, cell: int = 24) -> None:
    """Row-normalised confusion heat map: rows = true classes, columns = clusters in the
    order of their matched class (unmatched last), so a good result is a bright diagonal."""
    n_clusters = conf.shape[0]
    order = sorted(range(n_clusters), key=lambda k: (assignment[k] < 0, assignment[k], k))
    m = conf[order].T.astype(np.float64)  # (classes, clusters)
    rows = m.sum(1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    # a small perceptual ramp: dark blue -> teal -> yellow
    stops = np.array([[13, 8, 135], [33, 145, 140], [253, 231, 37]], np.float64)
    t = frac[..., None] * 2
    lo = np.clip(np.floor(t), 0, 1).astype(int)
    colour = stops[lo[..., 0]] + (stops[lo[..., 0] + 1] - stops[lo[..., 0]]) * (t - lo)
    img = np.repeat(np.repeat(colour, cell, 0), cell, 1)
    img[::cell, :] = 255
    img[:, ::cell] = 255
    import imageio.v3 as iio

    iio.imwrite(str(path), img.astype(np.uint8), extension=".png")
