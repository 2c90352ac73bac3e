"""Segment many files: resumable, atomic, on one machine or a dask.distributed cluster.

The napari-free engine behind ``napari-stego fit | segment | evaluate`` and
:func:`napari_stego.segment_files`.

How a ``segment`` job runs
--------------------------
1. *Plan* (on the caller's machine): expand files / globs / folders; read each TIFF's
   header (shape, axes, dtype) without its pixels; decide what is already finished. An
   output counts as finished only when it opens, carries napari-stego metadata with the
   same model hash, settings and input signature (size, mtime), has the expected shape
   and dtype, and its last plane decodes (an output of an older napari-stego, holding
   0-based labels, is recomputed). A stack's intensity mapping is measured here, once for
   the whole stack (at most 8 M values read), as ``predict_lazy`` measures it.
2. *Planes*: the unit of work is one 2D plane (``(H, W)`` or ``(H, W, C)``: RGB, or the
   channels the model maps with ``IntensityConfig.channels``) of one file; every leading
   axis (T, Z, Q, ...) of a stack is split into planes. A worker reads just that plane,
   predicts it through the core's :class:`~napari_stego.segment.Segmentation` (with the
   stack's mapping; the job's CRF settings and backend) and writes cluster ids 1..K (and
   the probabilities, when asked) itself, so the caller never holds pixel data. A single-plane file is written straight to its output; a stack's planes go to
   per-plane parts in ``OUT/.napari-stego-work/<name>/`` and a last task assembles them.
   Parts survive a killed job, so a re-run finishes a big stack without recomputing it.
3. *Tiles*: a plane bigger than one tile of the model's
   :class:`~napari_stego.tiling.TileConfig` (``features.is_single_tile`` is false) is not
   given to one worker whole. A *statistics* task measures a lone plane's intensity mapping
   once (:func:`~napari_stego.intensity.fit_intensity`, as ``StegoModel.predict`` does; a
   stack's tiles use the stack's mapping from the plan), then one
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

Modules, one job each: :mod:`.reports` (what a job reports), :mod:`.inputs` (files, TIFF
layouts, reading planes and regions), :mod:`.models` (the per-process model cache),
:mod:`.writes` (atomic writes, outputs, plane and tile parts), :mod:`.tasks` (what workers
run), :mod:`.plan` (outputs, metadata and resuming), :mod:`.schedule` (the pool and the
dispatcher), :mod:`.segment` and :mod:`.fit` (the entry points). Evaluation is
:mod:`napari_stego.evaluate`.
"""

from __future__ import annotations

from .fit import fit_files
from .inputs import TIFF_SUFFIXES, expand_inputs, read_planes
from .models import cached_model
from .reports import BatchReport, FileResult, FitReport, Log, Progress
from .segment import segment_files
from .writes import FORMATS, WORK_DIR

__all__ = [
    "BatchReport", "FileResult", "FitReport", "cached_model", "evaluate_folders",
    "expand_inputs", "fit_files", "read_planes", "segment_files",
]


def __getattr__(name: str):
    # evaluation is a core module of its own, which imports from this package
    if name == "evaluate_folders":
        from ..evaluate import evaluate_folders

        return evaluate_folders
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
