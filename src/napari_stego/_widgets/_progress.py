"""Progress of a background job in napari: :class:`ProgressRelay` takes the core's
``progress(stage, done, total)`` calls in the worker thread and draws them (a napari progress
bar and a status label) in the main thread, at most one update per
:data:`PROGRESS_INTERVAL_S` within a stage."""

from __future__ import annotations

import time

from magicgui.widgets import Label
from qtpy.QtCore import QObject, QTimer, Signal

__all__ = ["PROGRESS_INTERVAL_S", "STAGE_LABELS", "ProgressRelay"]

STAGE_LABELS = {
    "features": "extracting backbone features",
    "knn": "finding nearest-neighbour windows (KNN)",
    "train": "training the STEGO head",
    "cluster": "clustering the codes (k-means)",
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
    the worker thread: it emits a Qt signal, and the slot (in the main thread) drives one
    ``napari.utils.progress`` bar and a status label.

    The core reports ``features``, ``train`` and ``cluster``; the KNN table is built
    between the last feature map and the first training step, so that gap is labelled as
    such. A ``loss=`` keyword (or a 4th positional value), when the core gives one, is shown.
    Within a stage at most one update per :data:`PROGRESS_INTERVAL_S` is drawn (a new stage
    and a finished one at once); the latest skipped one is drawn when the interval is over.
    """

    _changed = Signal(str, int, int, object)

    def __init__(self, title: str, status: Label | None = None) -> None:
        super().__init__()
        self.title = title
        self.status = status
        self.stage = ""
        self.done = 0
        self.total = 0
        self.loss: float | None = None
        self.draws = 0  # updates drawn (for tests and benchmarks/gui_progress.py)
        self._bar = None
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
        # napari's progress bar may process Qt events while it redraws, so this slot can be
        # re-entered (and the job can finish) inside it: update the label first, and never
        # touch a closed bar.
        from napari.utils import progress

        self._drawn_at = time.monotonic()
        self.draws += 1
        label = STAGE_LABELS.get(stage, stage)
        if stage == "features" and total and done >= total:
            stage, label, done, total = "knn", STAGE_LABELS["knn"], 0, 1
        new_stage = stage != self.stage
        self.stage, self.done, self.total = stage, done, total
        show_loss = stage == "train" and self.loss is not None
        if self.status is not None:
            self.status.value = f"{label} {done}/{total}" + (
                f", loss {self.loss:.3f}" if show_loss else "")
        if self._bar is None:
            self._bar = progress(total=max(total, 1), desc=self.title)
        bar = self._bar
        if new_stage:
            bar.n = 0
        if new_stage or bar.total != max(total, 1):
            bar.total = max(total, 1)
        if self._closed:
            return
        bar.set_description(f"{self.title}: {label}" + (f" (loss {self.loss:.3f})"
                                                         if show_loss else ""))
        if self._closed:
            return
        bar.update(max(done - bar.n, 0))

    def close(self) -> None:
        self._closed = True
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()
