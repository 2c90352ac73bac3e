"""Worker-side tasks of a segment job: predict a plane, measure a tiled plane's
intensity mapping, predict one tile, assemble a file's parts into its outputs. Each runs
on a thread, a process or a dask worker and never raises for bad data."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..labels import ids_of, labels_dtype
from ..tiling import PlaneGrid
from .inputs import (_blank_reason, _describe, _Layout, _pixel_range, _plane_source, _PlaneArray,
                     _Range, _read_plane)
from .models import _model_of, _ModelRef
from .writes import _Grid, _save_part, _save_tile_part, _write_output, _write_tiled


@dataclass(frozen=True)
class _Settings:
    crf: bool = False
    probabilities: bool = False
    format: str = "tif"
    crf_config: object | None = None   # a CRFConfig (None: the defaults), with crf
    crf_backend: str | None = None     # None: crf.default_backend on each worker

    @property
    def crf_settings(self):
        """The CRFConfig of the job (``None`` without CRF)."""
        if not self.crf:
            return None
        from ..crf import CRFConfig

        return self.crf_config if self.crf_config is not None else CRFConfig()


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
    stats: tuple | None = None     # a stack's intensity mappings (features, CRF), measured once


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
    grid: PlaneGrid                # the plane's tiles, as the job planned them
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
    grid: _Grid | None = None      # tiled planes: PlaneGrid.cores; parts are tiles


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _predict_plane(model, plane: np.ndarray, settings: _Settings, stats: tuple | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Ids 1..K ``(H, W)`` and, when asked, probabilities ``(K, H, W)`` of one plane,
    through the core's :class:`~napari_stego.segment.Segmentation` (with a stack's
    intensity mappings ``stats`` when given, else the plane's own)."""
    from ..segment import Segmentation

    seg = Segmentation(model, plane, axes="YX" if plane.ndim == 2 else "YXC",
                       crf=settings.crf_settings, crf_backend=settings.crf_backend,
                       stats=None if stats is None else stats[0],
                       crf_stats=None if stats is None else stats[1])
    labels, probs = seg.plane(0, proba=True)
    return labels, (probs if settings.probabilities else None)


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
        labels, proba = _predict_plane(model, plane, task.settings, task.stats)
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
        dtype = labels_dtype(task.n_clusters)

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


def _crf_halo(config=None) -> int:
    from ..crf import default_halo

    return default_halo(config)


def _refine_window(image: np.ndarray, probs: np.ndarray, intensity,
                   origin: tuple[int, int], settings: _Settings) -> np.ndarray:
    """Dense CRF of one window of a plane, as :func:`~napari_stego.crf.dense_crf_tiled` runs
    each of its tiles: the job's CRF settings and backend, the bilateral lattice in
    whole-plane coordinates (``origin``: the window's top-left pixel).

    ``image``: raw ``(h, w, C)`` pixels; ``probs``: ``(K, h, w)``. Returns ``(K, h, w)``.
    """
    from ..crf import dense_crf

    return dense_crf(image[..., 0] if image.shape[-1] == 1 else image, probs,
                     config=settings.crf_settings, backend=settings.crf_backend,
                     intensity=intensity, origin=origin)


def _predict_tile(pred, tile: tuple[int, int], window, crf_intensity, settings: _Settings
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels ``(h, w)`` and, when asked, probabilities ``(K, h, w)`` of one tile core.

    Without CRF: ``pred.probs`` of the tile, the chunk ``StegoModel.predict`` computes for it.
    With CRF: the probabilities of ``window`` (the core grown by the CRF halo, see
    :meth:`~napari_stego.tiling.PlaneGrid.grown`), refined (:func:`_refine_window`), cropped
    to the core.
    """
    model = pred.model
    if not settings.crf:
        probs = pred.probs(0, *tile)
    else:
        wy, wx = window.y, window.x
        probs = pred.window_probs(0, window)
        image = pred.source.block(0, *window.core)
        probs = _refine_window(image, probs, crf_intensity, (wy.core[0], wx.core[0]),
                               settings)
        sy, sx = pred.ys[tile[0]], pred.xs[tile[1]]
        probs = np.ascontiguousarray(probs[:, sy.core[0] - wy.core[0]:sy.core[1] - wy.core[0],
                                           sx.core[0] - wx.core[0]:sx.core[1] - wx.core[0]])
    labels = ids_of(probs, model.n_clusters)
    return labels, (probs.astype(np.float32, copy=False) if settings.probabilities else None)


def _run_stats(task: _StatsTask) -> _PlaneResult:
    """Worker side: the intensity mapping of one tiled plane (``fit_intensity`` reads all its
    pixels up to 8 M values, else blocks spread over it), for all its tiles."""
    from ..intensity import fit_intensity

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
    from ..lazy import TilePredictor

    result, t0 = _start_task(task.flat)
    stage = "reading"
    try:
        with _PlaneArray(task.input, task.layout, task.flat) as arr:
            source = _plane_source(arr)
            stage = "loading the model"
            model = _model_of(task.model)
            pred = TilePredictor(model, source, task.stats[0], model.tile_config,
                                 grid=task.grid, lock=getattr(model, "_compute_lock", None))
            core = task.grid.tile(*task.tile)
            window = task.grid.grown(*task.tile, _crf_halo(task.settings.crf_settings)
                                     if task.settings.crf else 0)
            stage = "reading"
            arr[window.read]  # once; the predictor reuses it
            result.range = _pixel_range(arr[core.core])
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
