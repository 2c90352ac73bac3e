"""Planning a segment job (on the caller's machine): each input's layout, outputs and
metadata, what is finished already, and the plane / tile parts a killed job left."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import StegoError
from ..labels import crf_metadata, label_metadata, labels_dtype
from ..outputs import BLOCKED, REDO, VALID, check_output
from ..tiling import PlaneGrid
from .inputs import _base_name, _inspect, _Layout, _merge_ranges, _range_reason
from .models import _ModelRef
from .reports import FileResult, Log
from .tasks import _Settings
from .writes import (EXTENSIONS, WORK_DIR, _atomic_write, _clean_partials, _part_ok,
                     _tile_part_path, _tile_part_range)


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
    grid: PlaneGrid | None = None  # the tiles of tiled planes (None: planes predicted whole)
    tiles: dict = field(default_factory=dict)   # tiled plane -> its tiles still to predict
    left: dict = field(default_factory=dict)    # tiled plane -> its tiles not finished yet
    ranges: dict = field(default_factory=dict)  # tiled plane -> pixel range of its tiles
    stats: tuple | None = None  # a stack's intensity mappings (features, CRF), measured once


def _input_signature(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _plan(files: Sequence[Path], out: Path, ref: _ModelRef, shown: str, model,
          settings: _Settings, overwrite: bool, say: Log) -> list[_FileJob]:
    """Per input: its layout, its outputs and the planes still to compute."""
    jobs: list[_FileJob] = []
    ext = EXTENSIONS[settings.format]
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
            problem = _channel_problem(layout, model.feature_config.intensity)
            if problem:
                raise StegoError(problem)
            scale, unit = _scale(path, layout)
        except StegoError as exc:
            _fail(job, str(exc), say)
            continue
        job.layout, job.labels_out, job.proba_out = layout, labels_out, proba_out
        crf = crf_metadata(settings.crf_settings, settings.crf_backend) if settings.crf \
            else None
        job.meta = {
            "written_by": "napari-stego segment",
            "package_version": __version__,
            "complete": True,
            "layer_name": f"{name} labels",
            "model": {"path": shown, "sha256": ref.sha256, "backbone": model_meta["backbone"],
                      "n_clusters": model.n_clusters,
                      "weights_fingerprint": model_meta["weights_fingerprint"],
                      "package_version": model_meta["package_version"]},
            "settings": {"crf": crf},
            "input": {"path": str(path.resolve()), "signature": signature,
                      "shape": list(layout.shape), "axes": layout.axes, "dtype": layout.dtype},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **label_metadata(model.n_clusters, layout.out_axes, scale, unit, crf),
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
                                dtype=labels_dtype(model.n_clusters).str)
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
        if layout.n_planes > 1:  # one intensity mapping for the whole stack, as predict_lazy
            try:
                job.stats = _stack_stats(path, model, settings)
            except Exception as exc:
                _fail(job, f"cannot read pixels: truncated or corrupt TIFF ({exc})", say)
                continue
        if layout.n_planes > 1 or job.grid is not None:
            job.work = out / WORK_DIR / name
            _resume_parts(job, ref, settings, overwrite, model.n_clusters)
    return jobs


def _channel_problem(layout: _Layout, intensity) -> str | None:
    """Why the model cannot map this file's channels to RGB (``None``: it can)."""
    n = layout.n_channels
    if n == 1:
        return None
    channels = intensity.channels
    if channels is None:
        if n == 3 or (n == 4 and layout.axes[layout.rgb_axis] == "S"):
            return None  # RGB, RGBA
        return (f"has {n} channels (axes {layout.axes}, shape {layout.shape}) and the model "
                "maps none of them to RGB: fit it with --channels (three channel indices such "
                "as 0,1,1, or pca)")
    if channels != "pca" and max(channels) >= n:
        return (f"has {n} channels but the model takes channels {','.join(map(str, channels))} "
                "(--channels at fit time)")
    return None


def _scale(path: Path, layout: _Layout) -> tuple[list[float], str | None]:
    """Physical pixel size of the labels' axes (from the TIFF's metadata) and its unit."""
    import tifffile

    from ..labels import pixel_sizes

    try:
        with tifffile.TiffFile(str(path)) as tif:
            sizes, unit = pixel_sizes(tif, layout.axes)
    except Exception:
        sizes, unit = {}, None
    return [float(sizes.get(a, 1.0)) for a in layout.out_axes], unit


def _stack_stats(path: Path, model, settings: _Settings) -> tuple:
    """The intensity mappings of a stack's features and CRF, measured once on the whole
    stack (at most ``io.STAT_SAMPLES`` values read), as ``predict_lazy`` measures them."""
    from ..io import fit_intensity, open_image

    source = open_image(path)
    stats = fit_intensity(source, model.feature_config.intensity)
    crf = None
    if settings.crf:
        config = settings.crf_settings.intensity
        crf = stats if config == model.feature_config.intensity else \
            fit_intensity(source, config)
    return stats, crf


def _resume_parts(job: _FileJob, ref: _ModelRef, settings: _Settings, overwrite: bool,
                  n_clusters: int) -> None:
    """Reuse the plane (and tile) parts a killed job left, when they were made the same
    way; set ``job.todo`` to the planes with work left (and ``job.tiles`` to their tiles)."""
    stamp = {"model": ref.sha256, "settings": asdict(settings),
             "input": job.meta["input"], "n_clusters": n_clusters,
             "grid": None if job.grid is None else job.grid.cores}
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
            for tile in job.grid.indices():
                part = _tile_part_path(job.work, flat, tile)
                rng = None
                if not fresh:
                    _clean_partials(part)
                    rng = _tile_part_range(part, job.grid.tile(*tile).core_shape,
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


def _skip(job: _FileJob, reason: str, say: Log) -> None:
    job.result.status, job.done = "skipped", True
    job.result.message = f"{reason}: nothing to segment, no output written"
    job.result.outputs = []
    say(f"skipped: {job.result.line()}")


def _plane_grid(model, shape2d: tuple[int, int]) -> PlaneGrid | None:
    """The tiles a plane of ``shape2d`` pixels is predicted in
    (:func:`~napari_stego.features.plane_grid`, the grid the workers'
    :class:`~napari_stego.lazy.TilePredictor` then use), or ``None`` when it is predicted
    whole: it fits one tile, or the model blends tiles with ``"taper"`` (which needs the
    feature map of the whole plane).
    """
    from ..features import plane_grid

    if model.tile_config.blend != "crop":
        return None
    grid = plane_grid(tuple(shape2d), model.backbone, model.feature_config, model.tile_config)
    return None if grid.whole or grid.single else grid
