"""What the napari-stego widgets share: the viewer's current model, progress relay,
background jobs, notifications and small layout helpers (layer sources and output layers
are :mod:`._layers`).

Only this subpackage (and the other underscore modules) imports napari or Qt. Computation
goes through :class:`~napari_stego.model.StegoModel`, :mod:`napari_stego.metrics` and the
core; the widgets gather settings, run one ``thread_worker`` at a time, feed their own
progress bar from the core's ``progress(stage, done, total)`` callback, and add or update
layers.
"""

from __future__ import annotations

import html
import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, Label, PushButton
from psygnal import Signal as PSignal

from ..errors import Cancelled, StegoError, WeightsMissing
from ..labels import LABEL_OFFSET  # noqa: F401  (the widgets' convention)
from ._progress import PROGRESS_INTERVAL_S, STAGE_LABELS, ProgressRelay  # noqa: F401

if TYPE_CHECKING:
    import napari

    from ..model import StegoModel

log = logging.getLogger("napari_stego")



# ----------------------------------------------------------------------- imports
_WARM = False


def warm_imports() -> None:
    """Import torch, timm (with torchvision / triton) and the core in the main thread, once.

    Some compiled extensions (triton, pulled in by ``torch._dynamo`` through torchvision and
    timm) crash the process when first imported inside a Qt worker thread; importing them
    here, when a widget is built, keeps every later ``thread_worker`` safe. Costs a few
    seconds once per session.
    """
    global _WARM
    if _WARM:
        return
    import importlib

    hide_triton_if_mesa_llvm()

    for name in ("torch", "timm", "timm.models.vision_transformer", "torchvision.ops",
                 "torch._dynamo", "napari_stego.model", "napari_stego.features",
                 "napari_stego.crf"):
        try:
            importlib.import_module(name)
        except ImportError:  # optional pieces (torchvision, the CRF module) may be missing
            pass
    _WARM = True


def hide_triton_if_mesa_llvm() -> bool:
    """Keep torch from importing triton when Mesa's libLLVM is already loaded.

    Mesa's software OpenGL (llvmpipe: machines without a GPU driver, VMs, remote desktops,
    Xvfb) maps its own libLLVM into napari's process; importing triton (whose bundled LLVM
    clashes with it) afterwards segfaults. timm imports torchvision, which imports
    ``torch._dynamo``, which imports triton when it is installed (the default Linux torch
    wheels bring it). napari-stego never needs triton (no ``torch.compile``), so when the
    clash is possible torch is told triton is absent. Returns whether it was hidden.
    """
    import sys

    if "triton" in sys.modules or not _mesa_llvm_loaded():
        return False
    log.info("Mesa's libLLVM is loaded: hiding triton from torch to avoid a crash")
    sys.modules["triton"] = None
    return True


def _mesa_llvm_loaded() -> bool:
    """Whether a libLLVM (Mesa's) is mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            return "libLLVM" in f.read()
    except OSError:
        return False


# ------------------------------------------------------------------------- the model
class ModelStore:
    """The model the widgets of one viewer share: Fit sets it, Segment / Evaluate /
    Correspondences use it. Reach it from the console with ``model_store(viewer).model``."""

    changed = PSignal(object)

    def __init__(self) -> None:
        self.model: StegoModel | None = None
        self.origin: str = ""  # "fitted on ..." / "loaded from ..."

    def set(self, model: StegoModel | None, origin: str = "") -> None:
        self.model = model
        self.origin = origin
        self.changed.emit(model)

    def describe(self) -> str:
        if self.model is None:
            return "no model yet: fit one (Fit STEGO) or load a .stego file"
        m = self.model
        return (f"{m.backbone.spec.name}, K={m.n_clusters}, code dim {m.head.code_dim}"
                + (f" — {self.origin}" if self.origin else ""))


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_store(viewer: napari.viewer.Viewer) -> ModelStore:
    """The :class:`ModelStore` of ``viewer`` (one per viewer, made on first use)."""
    store = _STORES.get(viewer)
    if store is None:
        store = _STORES[viewer] = ModelStore()
    return store


def model_summary(model: StegoModel) -> dict:
    """The part of ``model.metadata()`` a layer should carry: what made it."""
    meta = model.metadata()
    train = meta["train_config"]
    return dict(backbone=meta["backbone"], weights_source=meta["weights_source"],
                n_clusters=meta["n_clusters"], code_dim=meta["code_dim"],
                steps=train["steps"], batch_size=train["batch_size"],
                seed=meta["info"].get("seed"), n_images=meta["info"].get("n_images"),
                final_loss=meta["info"].get("final_loss"),
                tile=(meta.get("tile_config") or {}).get("tile"),
                package_version=meta["package_version"])


# ---------------------------------------------------------------------- notifications
def error_text(exc: BaseException) -> str:
    """The message of ``exc`` for a widget: a missing-weights advice in the widgets' words."""
    return exc.advice("widget") if isinstance(exc, WeightsMissing) else str(exc)


def notify_error(exc: BaseException, what: str) -> None:
    """Show an exception from a job as a napari notification that says what to do."""
    from napari.utils.notifications import show_error, show_info

    if isinstance(exc, Cancelled):
        show_info(f"{what} cancelled")
    elif isinstance(exc, StegoError):
        show_error(f"{what}: {error_text(exc)}")
    elif isinstance(exc, ImportError):
        show_error(f"{what}: a package is missing ({exc}). Install it with pip and restart "
                   "napari.")
    elif isinstance(exc, MemoryError):
        show_error(f"{what}: out of memory. Use fewer or smaller images (fewer slices), a "
                   "smaller batch size, or a machine with more memory.")
    else:
        log.error("%s failed", what, exc_info=exc)
        show_error(f"{what} failed unexpectedly: {type(exc).__name__}: {exc} (this is a bug in "
                   "napari-stego; the traceback is in the log)")


class Job:
    """One background job of a widget: a napari ``thread_worker``, its cancel event and
    progress relay. ``start`` returns at once; the callbacks run in the main thread."""

    def __init__(self, title: str, func: Callable, *, status: Label | None = None,
                 bar=None, on_yield: Callable | None = None, on_done: Callable | None = None,
                 on_end: Callable | None = None) -> None:
        from napari.qt.threading import create_worker

        warm_imports()
        self.title = title
        self.cancel = threading.Event()
        self.progress = ProgressRelay(title, status, bar)
        self.status = status
        self.error: BaseException | None = None
        self.result = None
        self.finished = False
        self._on_end = on_end
        # errors go to our handler (a notification); without one napari re-raises them
        self.worker = create_worker(func, self.progress, self.cancel, _start_thread=False,
                                    _connect={"errored": self._errored})
        if on_yield is not None and hasattr(self.worker, "yielded"):
            self.worker.yielded.connect(on_yield)
        self.worker.returned.connect(self._returned)
        if on_done is not None:
            self.worker.returned.connect(on_done)
        self.worker.finished.connect(self._finished)

    def start(self) -> Job:
        self.worker.start()
        return self

    def _returned(self, result) -> None:
        self.result = result

    def _errored(self, exc: BaseException) -> None:
        self.error = exc
        notify_error(exc, self.title)
        if self.status is not None:
            if isinstance(exc, Cancelled):
                self.status.value = "cancelled"
            elif isinstance(exc, StegoError):  # the whole advice: the fix comes first
                self.status.value = f"failed: {html.escape(error_text(exc), quote=False)}"
            else:
                self.status.value = f"failed: {html.escape(str(exc)[:300], quote=False)}"

    def _finished(self) -> None:
        self.finished = True
        self.progress.close()
        if self._on_end is not None:
            self._on_end(self)


class JobMixin:
    """Run-button / cancel-button handling for a widget with one job at a time."""

    job: Job | None = None
    run_button: PushButton
    cancel_button: PushButton
    status: Label

    def _start_job(self, title: str, func: Callable, **callbacks) -> Job | None:
        if self.busy:
            from napari.utils.notifications import show_warning

            show_warning(f"{title}: a job of this widget is still running; wait or cancel it")
            return None
        user_end = callbacks.pop("on_end", None)

        def on_end(job: Job) -> None:
            self.run_button.enabled = True
            self.cancel_button.enabled = False
            if user_end is not None:
                user_end(job)

        self.job = Job(title, func, status=self.status, bar=self.progress_bar, on_end=on_end,
                       **callbacks)
        cancel = self.job.cancel
        self.native.destroyed.connect(lambda *_: cancel.set())  # widget closed: stop the job
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"{title}: starting…"
        return self.job.start()

    @property
    def progress_bar(self):
        """The tool's progress bar (a ``QProgressBar`` under the status line, made on first
        use; shown while a job runs). napari's activity bar is not used (see
        :mod:`._progress`)."""
        bar = getattr(self, "_progress_bar", None)
        if bar is None:
            from qtpy.QtWidgets import QProgressBar

            bar = self._progress_bar = QProgressBar()
            bar.setTextVisible(True)
            bar.setVisible(False)
            insert_after(self, self.status, bar)
        return bar

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.finished

    def cancel(self) -> None:
        """Ask the running job to stop (it stops at the next slice / step)."""
        if self.busy:
            self.job.cancel.set()
            self.status.value = "cancelling…"


class SharedModelMixin(JobMixin):
    """A widget that uses the viewer's shared model: ``store``, a ``model_label`` showing it
    and a *Load model…* button (:func:`load_model_job`)."""

    store: ModelStore
    model_label: Label

    @property
    def model(self):
        """The viewer's current model (``None`` until one is fitted or loaded)."""
        return self.store.model

    def _model_changed(self, _model=None) -> None:
        self.model_label.value = f"<b>Model:</b> {self.store.describe()}"

    def load_model(self, path=None):
        """Load a ``.stego`` file in the background (a file dialog when ``path`` is None)."""
        return load_model_job(self, path)


def run_buttons(run_text: str, run_tip: str) -> tuple[PushButton, PushButton]:
    run = PushButton(text=run_text, tooltip=run_tip)
    cancel = PushButton(text="Cancel", enabled=False,
                        tooltip="Stop the running job at the next step / slice; nothing is "
                                "kept from a cancelled fit.")
    return run, cancel


def insert_after(container: Container, anchor, qwidget) -> None:
    """Put a plain Qt widget into ``container``'s layout right after magicgui ``anchor``."""
    layout = container.native.layout()
    for i in range(layout.count()):
        w = layout.itemAt(i).widget()
        if w is not None and (w is anchor.native or w.isAncestorOf(anchor.native)):
            layout.insertWidget(i + 1, qwidget)
            return
    layout.addWidget(qwidget)


def finish_layout(container: Container, max_height_select: int = 96) -> None:
    """Top-align the rows (no stretched gaps) of a dock widget."""
    container.native.layout().addStretch(1)


def text(value: str = "") -> Label:
    """A left-aligned, word-wrapping rich-text label."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QSizePolicy

    label = Label(value=value)
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Minimum)
    label.native.setMinimumWidth(220)
    label.native.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
    label.native.setTextFormat(Qt.RichText)
    return label


def collapsible(title: str, widgets: list) -> Any:
    """A superqt fold ("advanced") holding magicgui widgets; returns (fold, container)."""
    from superqt import QCollapsible

    inner = Container(widgets=widgets)
    fold = QCollapsible(title, expandedIcon="▼", collapsedIcon="▶")
    fold.addWidget(inner.native)
    fold.collapse(animate=False)
    return fold, inner


def optional_path(value) -> str | None:
    """A FileEdit value as a path string, or ``None`` when empty."""
    from pathlib import Path

    if value is None or str(value) in ("", ".") or Path(str(value)) == Path("."):
        return None
    return str(value)


def load_model_job(widget: JobMixin, path=None, *, weights=None, device="auto"):
    """Load a ``.stego`` file in ``widget``'s background job and share it with the
    viewer's widgets; asks with a file dialog when ``path`` is ``None``."""
    from pathlib import Path

    if path is None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(widget.native, "Load STEGO model", "",
                                              "STEGO model (*.stego);;All files (*)")
        if not path:
            return None
    weights = optional_path(weights)
    store = model_store(widget.viewer)

    def work(progress, cancel):
        from ..model import StegoModel

        return StegoModel.load(path, weights=weights, device=device)

    def done(model) -> None:
        store.set(model, f"loaded from {Path(path).name}")
        widget.status.value = f"loaded {Path(path).name}"

    return widget._start_job("Load model", work, on_done=done)
