"""What the napari-stego widgets share: the viewer's current model, layer sources, progress
relay, background jobs, notifications and output layers.

Only this subpackage (and the other underscore modules) imports napari or Qt. Computation
goes through :class:`~napari_stego.model.StegoModel`, :mod:`napari_stego.metrics` and the
core; the widgets gather settings, run one ``thread_worker`` at a time, feed napari's
progress bar from the core's ``progress(stage, done, total)`` callback, and add or update
layers.
"""

from __future__ import annotations

import html
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, Container, Label, PushButton, Select
from psygnal import Signal as PSignal

from ..errors import Cancelled, StegoError, WeightsMissing
from ._progress import PROGRESS_INTERVAL_S, STAGE_LABELS, ProgressRelay  # noqa: F401

if TYPE_CHECKING:
    import napari

    from ..model import StegoModel

log = logging.getLogger("napari_stego")

META_KEY = "napari_stego"  # layer.metadata key of everything napari-stego made
LABEL_OFFSET = 1  # label value = cluster id + 1, so 0 stays "not segmented (yet)"


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
                 on_yield: Callable | None = None, on_done: Callable | None = None,
                 on_end: Callable | None = None) -> None:
        from napari.qt.threading import create_worker

        warm_imports()
        self.title = title
        self.cancel = threading.Event()
        self.progress = ProgressRelay(title, status)
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

        self.job = Job(title, func, status=self.status, on_end=on_end, **callbacks)
        cancel = self.job.cancel
        self.native.destroyed.connect(lambda *_: cancel.set())  # widget closed: stop the job
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"{title}: starting…"
        return self.job.start()

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


# ------------------------------------------------------------------- layer sources
@dataclass
class Source:
    """Images to process, taken from one Image layer or from several layers used as the
    channels of one image. ``lead`` are the stack axes (planes, time points ...) in front of
    the ``(H, W)`` or ``(H, W, C)`` image."""

    name: str
    layers: list = field(default_factory=list)
    lead: tuple[int, ...] = ()
    size: tuple[int, int] = (0, 0)

    @property
    def first(self):
        return self.layers[0]

    def indices(self) -> list[tuple[int, ...]]:
        return list(np.ndindex(*self.lead)) if self.lead else [()]

    def image(self, idx: tuple[int, ...] = ()) -> np.ndarray:
        """The 2D image at stack index ``idx``: ``(H, W)``, ``(H, W, 3|4)`` or, for
        channel layers, ``(H, W, 3)`` float (each channel stretched on its own)."""
        if len(self.layers) == 1:
            return np.asarray(_data(self.first)[idx])
        from ..io import to_unit_range

        chans = [to_unit_range(np.asarray(_data(layer)[idx])) for layer in self.layers]
        while len(chans) < 3:
            chans.append(np.zeros_like(chans[0]))
        return np.stack(chans, axis=-1)

    def current_index(self, viewer) -> tuple[int, ...]:
        """The stack index the viewer shows now (clipped to the stack)."""
        if not self.lead:
            return ()
        return current_index(viewer, self.first, self.lead)

    def order(self, viewer) -> list[tuple[int, ...]]:
        """All stack indices, the shown slice first, then by distance from it."""
        cur = np.array(self.current_index(viewer))
        idx = self.indices()
        return sorted(idx, key=lambda i: (float(np.abs(np.array(i) - cur).sum()), i))


def _data(layer):
    """The full-resolution data of an Image layer (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def current_index(viewer, layer, lead: tuple[int, ...]) -> tuple[int, ...]:
    ndim = layer.ndim
    point = np.asarray(viewer.dims.point)[-ndim:]
    data_pt = np.asarray(layer.world_to_data(point))
    return tuple(int(np.clip(round(float(v)), 0, n - 1))
                 for v, n in zip(data_pt[: len(lead)], lead))


def layer_source(layer) -> Source:
    """A :class:`Source` of one napari Image layer, with a clear error for other layers."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        raise StegoError(f"layer {layer.name!r} is a {type(layer).__name__} layer: choose an "
                         "Image layer (grey, RGB or a stack)")
    shape = tuple(_data(layer).shape)
    spatial = 3 if layer.rgb else 2
    if len(shape) < spatial:
        raise StegoError(f"layer {layer.name!r} has shape {shape}: it needs at least two "
                         "spatial axes (Y, X)")
    lead = shape[: len(shape) - spatial]
    return Source(layer.name, [layer], lead, (shape[len(lead)], shape[len(lead) + 1]))


def channel_source(layers: list) -> Source:
    """One :class:`Source` whose channels are the given grey layers (2 or 3, same shape)."""
    if not 2 <= len(layers) <= 3:
        raise StegoError(f"'layers are channels' combines 2 or 3 grey layers into one image; "
                         f"{len(layers)} are chosen")
    srcs = [layer_source(layer) for layer in layers]
    for s in srcs:
        if s.first.rgb:
            raise StegoError(f"layer {s.name!r} is RGB: only grey layers can be channels")
        if (s.lead, s.size) != (srcs[0].lead, srcs[0].size):
            raise StegoError(f"channel layers must have the same shape: {s.name!r} is "
                             f"{(*s.lead, *s.size)}, {srcs[0].name!r} is "
                             f"{(*srcs[0].lead, *srcs[0].size)}")
    return Source("+".join(s.name for s in srcs), [s.first for s in srcs], srcs[0].lead,
                  srcs[0].size)


def sources_of(layers: list, as_channels: bool) -> list[Source]:
    if not layers:
        raise StegoError("no image layer chosen: open an image (File > Open, or File > Open "
                         "Sample > napari-stego) and tick it in the list")
    if as_channels and len(layers) > 1:
        return [channel_source(list(layers))]
    return [layer_source(layer) for layer in layers]


class LayerPicker(Container):
    """A multi-select list of the viewer's Image layers plus 'layers are channels'."""

    def __init__(self, viewer, label: str = "images", tooltip: str = "") -> None:
        self._viewer = viewer
        self.layers = Select(label=label, choices=self._choices, allow_multiple=True,
                             tooltip=tooltip or "Image layers to use (Ctrl/Shift-click picks "
                             "several). Grey, RGB, and 3D / time stacks all work.")
        self.as_channels = CheckBox(
            text="layers are channels of one image", value=False,
            tooltip="Combine 2 or 3 chosen grey layers (e.g. the channels of one acquisition, "
                    "as napari opens them) into one multichannel image.")
        super().__init__(widgets=[text(f"<b>{label}</b> (Ctrl/Shift-click for several)"),
                                  self.layers, self.as_channels], labels=False)
        self.layers.native.setMaximumHeight(90)
        self.margins = (0, 0, 0, 0)
        events = viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self._refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self._refresh)
        events.inserted.connect(lambda e: e.value.events.name.connect(self._refresh))

    def _choices(self, _widget=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and META_KEY not in layer.metadata]

    def _refresh(self, _event=None) -> None:
        before = list(self.layers.value)
        self.layers.reset_choices()
        keep = [layer for layer in before if layer in self._viewer.layers]
        if keep:
            self.layers.value = keep

    def select_active(self) -> None:
        """Pre-select the active layer (or the first image) if nothing is chosen yet."""

        self.layers.reset_choices()
        if self.layers.value:
            return
        valid = [layer for _, layer in self._choices()]
        active = self._viewer.layers.selection.active
        choice = active if any(active is v for v in valid) else (valid[0] if valid else None)
        if choice is not None:
            self.layers.value = [choice]

    def sources(self) -> list[Source]:
        return sources_of(list(self.layers.value), bool(self.as_channels.value))


# --------------------------------------------------------------------- output layers
def find_output(viewer, key: str):
    """The layer napari-stego made earlier for ``key`` (or ``None``), found by metadata,
    so renaming it does not matter and a user's own layer of the same name is never used."""
    for layer in viewer.layers:
        meta = layer.metadata.get(META_KEY)
        if isinstance(meta, dict) and meta.get("output_key") == key:
            return layer
    return None


def spatial_kwargs(layer) -> dict:
    """Scale and translation of an Image layer's displayed axes (no RGB channel axis)."""
    return dict(scale=tuple(layer.scale), translate=tuple(layer.translate))


def output_layer(viewer, key: str, kind: str, name: str, shape: tuple, dtype, meta: dict,
                 like, **kwargs):
    """Add a new Labels / Image layer for ``key`` or reuse the one made before.

    A reused layer keeps its name and display settings, gets fresh zeroed data if its shape
    or dtype changed (else is zeroed in place) and new metadata. The user's layers are never
    touched: outputs are found by ``metadata['napari_stego']['output_key']``.
    """
    meta = {**meta, "output_key": key}
    layer = find_output(viewer, key)
    if layer is not None and layer.__class__.__name__.lower() == kind:
        data = layer.data
        if isinstance(data, np.ndarray) and data.shape == tuple(shape) and data.dtype == dtype:
            data[...] = 0
            layer.metadata = {**layer.metadata, META_KEY: meta}
            layer.refresh()
            return layer
        layer.data = np.zeros(shape, dtype)
        layer.metadata = {**layer.metadata, META_KEY: meta}
        for k in ("scale", "translate"):
            setattr(layer, k, spatial_kwargs(like)[k])
        return layer
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(np.zeros(shape, dtype), name=name, metadata={META_KEY: meta},
               **spatial_kwargs(like), **kwargs)


def labels_dtype(n_clusters: int):
    return np.uint8 if n_clusters + LABEL_OFFSET <= 255 else np.uint16


def write_slice(layer, idx: tuple[int, ...], values: np.ndarray) -> None:
    layer.data[idx] = values
    layer.refresh()


def iter_chunks(seq: Iterable, n: int) -> Iterable[list]:
    chunk: list = []
    for item in seq:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
