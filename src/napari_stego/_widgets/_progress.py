"""Progress of a background job in napari: :class:`ProgressRelay` takes the core's
``progress(stage, done, total)`` calls in the worker thread and draws them (the tool's own
progress bar and status label) in the main thread, at most one update per
:data:`PROGRESS_INTERVAL_S` within a stage.

The bar is a plain ``QProgressBar`` in the tool, not a ``napari.utils.progress`` bar: napari
starts an animated "in progress" indicator (a 30 ms-per-frame GIF) beside its *activity*
button for as long as any of its progress bars is open, and in a window with an OpenGL canvas
every frame of it makes Qt compose the whole window through OpenGL again. Under software
OpenGL (Mesa's llvmpipe: VMs, remote desktops, Xvfb) that took 19-21 CPU seconds per
60-step fit on a 2-core machine and made the panel's fit 1.8-2.1 times as long as the same
fit from the console; with the tool's own bar, 1.07-1.22 times (docs/benchmarks.md, "GUI fit
vs console fit").
"""

from __future__ import annotations

import time

from magicgui.widgets import Label
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QProgressBar

__all__ = ["PROGRESS_INTERVAL_S", "STAGE_LABELS", "ProgressRelay"]

STAGE_LABELS = {
    "features": "extracting backbone features",
    "knn": "finding nearest-neighbour windows (KNN)",
    "train": "training the STEGO head",
    "cluster": "clustering the codes (k-means, then the principal-mask refinement)",
    "segment": "segmenting",
    "crf": "refining with the dense CRF",
    "evaluate": "counting pixels",
    "correspond": "computing features",
}


# at most one drawn progress update per this many seconds within a stage (the training
# reports every step; each draw costs the main thread ~16 ms, docs/benchmarks.md)
PROGRESS_INTERVAL_S = 0.1


class ProgressRelay(QObject):
    """A ``progress(stage, done, total, **info)`` callable for the core, safe to call from
    the worker thread: it emits a Qt signal, and the slot (in the main thread) drives a
    ``QProgressBar`` (shown while the job runs, hidden when it ends) and a status label.

    The core reports ``features``, ``knn`` (per chunk of the nearest-neighbour mining and
    per batch of the automatic shifts), ``train`` and ``cluster``; the end of the features
    is drawn as the start of the KNN stage. A ``loss=`` keyword (or a 4th positional value),
    when the core gives one, is shown.
    Within a stage at most one update per :data:`PROGRESS_INTERVAL_S` is drawn (a new stage
    and a finished one at once); the latest skipped one is drawn when the interval is over.
    """

    _changed = Signal(str, int, int, object)

    def __init__(self, title: str, status: Label | None = None,
                 bar: QProgressBar | None = None) -> None:
        super().__init__()
        self.title = title
        self.status = status
        self.bar = bar
        self.stage = ""
        self.done = 0
        self.total = 0
        self.loss: float | None = None
        self.draws = 0  # updates drawn (for tests and benchmarks/gui_progress.py)
        self._closed = False
        self._drawn_at = -float("inf")
        self._pending: tuple[str, int, int] | None = None
        self._changed.connect(self._update)

    def __call__(self, stage: str, done: int, total: int, *extra, **info) -> None:
        loss = info.get("loss", extra[0] if extra else None)
        self._changed.emit(stage, int(done), int(total), loss)

    def _update(self, stage: str, done: int, total: int, loss) -> None:
        if self._closed:
            return
        if loss is not None:
            self.loss = float(loss)
        same_stage = stage == self.stage
        unfinished = not total or done < total
        if same_stage and unfinished and \
                time.monotonic() - self._drawn_at < PROGRESS_INTERVAL_S:
            if self._pending is None:
                QTimer.singleShot(int(PROGRESS_INTERVAL_S * 1000), self._flush)
            self._pending = (stage, done, total)
            return
        self._pending = None
        self._draw(stage, done, total)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not self._closed:
            self._draw(*pending)

    def _draw(self, stage: str, done: int, total: int) -> None:
        self._drawn_at = time.monotonic()
        self.draws += 1
        label = STAGE_LABELS.get(stage, stage)
        if stage == "features" and total and done >= total:
            stage, label, done, total = "knn", STAGE_LABELS["knn"], 0, 1
        self.stage, self.done, self.total = stage, done, total
        show_loss = stage == "train" and self.loss is not None
        if self.status is not None:
            self.status.value = f"{label} {done}/{total}" + (
                f", loss {self.loss:.3f}" if show_loss else "")
        if self.bar is not None:
            self.bar.setRange(0, max(total, 1))
            self.bar.setValue(min(max(done, 0), max(total, 1)))
            self.bar.setToolTip(f"{self.title}: {label}")
            self.bar.setVisible(True)

    def close(self) -> None:
        self._closed = True
        if self.bar is not None:
            self.bar.setVisible(False)
