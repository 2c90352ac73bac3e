"""``segment_files``: segment many files with one model (see the package docstring)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

from ..errors import Cancelled, StegoError
from .inputs import expand_inputs
from .models import _MODELS, _MODELS_LOCK, _prepare_model
from .plan import _plan
from .reports import BatchReport, Log, Progress
from .schedule import _dispatch, _local_dask, _Pool, _Tally
from .tasks import _Settings
from .writes import FORMATS, WORK_DIR, _remove


def segment_files(model, inputs, out: str | os.PathLike, *, crf=False,
                  crf_backend: str | None = None, probabilities: bool = False, format: str = "tif", overwrite: bool = False,
                  scheduler=None, workers: int = 1, weights: str | os.PathLike | None = None,
                  device: str | None = None, progress: Progress | None = None,
                  log: Log | None = None, cancel=None) -> BatchReport:
    """Segment many TIFF files (and every plane of each stack) with one model.

    Writes one labels file per input into ``out`` with the input's base name
    (``cells_01.ome.tif`` -> ``out/cells_01.tif``), the same spatial shape and the input's
    leading axes. Labels are cluster ids 1..K (0 = no data; :mod:`napari_stego.labels`) in
    :func:`~napari_stego.labels.labels_dtype` (uint8 up to K = 255). The outputs keep the
    input's axes names and physical pixel size (ImageJ / TIFF metadata, zarr attributes)
    and JSON metadata recording the model (path, SHA-256, backbone, K), the settings (the
    CRF's included), the input's signature and the package version. Re-running skips
    finished outputs; see the package docstring.

    Args:
        model: a ``.stego`` file or a :class:`~napari_stego.model.StegoModel`.
        inputs: files, globs (``"data/**/*.tif"``) and folders, or one of them.
        out: the output folder (created).
        crf: refine with the dense CRF before the argmax: ``True`` (the reference
            settings) or a :class:`~napari_stego.crf.CRFConfig`. The settings and the
            backend are stored in the outputs' metadata.
        crf_backend: ``None`` / ``"auto"`` (:func:`~napari_stego.crf.default_backend` on
            each worker), ``"torch"`` or ``"pydensecrf"``.
        probabilities: also write ``<name>_proba.tif`` with float32 ``(..., K, H, W)``
            cluster probabilities.
        format: ``"tif"`` (zlib-compressed TIFF: ImageJ hyperstack with axes and pixel
            size where ImageJ allows), ``"zarr"`` (a ``<name>.zarr`` folder) or
            ``"ome-zarr"`` (a ``<name>.ome.zarr`` OME-NGFF multiscale image with axes and
            scale; needs the ``ome-zarr`` package).
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
            tile, see the package docstring) also ``progress("tiles", done, total)``.
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
    if format == "ome-zarr":
        from ..ngff import require

        require()
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

    from ..crf import BACKENDS, CRFConfig, with_channels_of

    if crf_backend not in (None, "auto", *BACKENDS):
        raise StegoError(f"unknown CRF backend {crf_backend!r}: use auto, "
                         f"{', '.join(BACKENDS)}")
    if not isinstance(crf, (bool, CRFConfig)) and crf is not None:
        raise StegoError(f"crf must be True, False or a CRFConfig, got {type(crf).__name__}")
    settings = _Settings(crf=crf is not None and crf is not False,
                         probabilities=bool(probabilities), format=format, crf_config=crf if isinstance(crf, CRFConfig) else None,
                         crf_backend=None if crf_backend == "auto" else crf_backend)
    pool = _Pool(scheduler, workers)
    cancelled, temporary, ref = True, None, None
    try:
        ref, loaded, shown, temporary = _prepare_model(model, out, weights, device, pool.local)
        if settings.crf:  # the CRF's colours of multichannel images: the model's channels
            settings = replace(settings, crf_config=with_channels_of(
                settings.crf_settings, loaded.feature_config.intensity))
        jobs = _plan(files, out, ref, shown, loaded, settings, overwrite, say)
        report = BatchReport([*problems, *(j.result for j in jobs)], str(out))
        busy = [j for j in jobs if not j.done]
        total = sum(j.layout.n_planes for j in busy)
        planes = _Tally("segment", progress, total - sum(len(j.todo) for j in busy), total)
        planes.report()
        total = sum(j.layout.n_planes * j.grid.n_tiles for j in busy if j.grid)
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
