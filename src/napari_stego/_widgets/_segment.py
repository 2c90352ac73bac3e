"""The *Segment* dock widget: apply the fitted (or a loaded) model to Image layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton, SpinBox

from ..errors import Cancelled, StegoError
from ..labels import crf_metadata, label_metadata
from ._common import (
    SharedModelMixin,
    collapsible,
    finish_layout,
    insert_after,
    model_store,
    model_summary,
    notify_error,
    run_buttons,
    text,
    warm_imports,
)
from ._layers import LayerPicker, labels_dtype, layer_data, layer_geometry, output_layer

if TYPE_CHECKING:
    import napari

ALL_SLICES = "all slices (shown one first)"
CURRENT_SLICE = "shown slice only"


def crf_module():
    """:mod:`napari_stego.crf`, with a user-readable error when it cannot be imported."""
    try:
        from .. import crf
    except ImportError as exc:
        raise StegoError(f"the dense CRF is not available ({exc}); untick 'CRF' or install "
                         "napari-stego with its CRF extra: pip install 'napari-stego[crf]'"
                         ) from None
    return crf


class SegmentWidget(Container, SharedModelMixin):
    """Segment Image layers with the viewer's STEGO model.

    Adds (or, on re-runs, updates) a Labels layer ``"<image> clusters"`` and, with the CRF
    ticked, ``"<image> CRF"``. Labels are cluster ids 1..K (:mod:`napari_stego.labels`), so
    0 means "not segmented yet": stacks are filled slice by slice in the background, the
    shown slice first. The computation is the core's :class:`~napari_stego.segment.
    Segmentation` (one intensity mapping per stack, the model's tiles, the CRF settings
    and backend chosen here), so the labels equal ``predict_lazy``'s and the CLI's.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        warm_imports()
        self.viewer = napari_viewer
        self.store = model_store(napari_viewer)
        self.picker = LayerPicker(napari_viewer, label="Images to segment",
                                  tooltip="Image layers to segment: any, also ones the model "
                                          "was not fitted on. Each gets its own result layer.")
        self.slices = ComboBox(label="stacks", choices=[ALL_SLICES, CURRENT_SLICE],
                               value=ALL_SLICES,
                               tooltip="For 3D / time stacks: segment every slice (the shown "
                                       "one first, the others fill in as they finish) or only "
                                       "the shown one.")
        self.crf = CheckBox(text="refine with a dense CRF (adds '<image> CRF')", value=False,
                            tooltip="Snap cluster borders to image edges (Krähenbühl & Koltun "
                                    "dense CRF, STEGO's settings). Slower.")
        defaults = _crf_defaults()
        self.crf_backend = ComboBox(label="CRF backend", choices=["auto", "torch", "pydensecrf"],
                                    value="auto",
                                    tooltip="'pydensecrf' is the reference C++ code (CPU); "
                                            "'torch' runs on a GPU or the CPU; 'auto' picks.")
        self.crf_iterations = SpinBox(label="iterations", value=defaults["iterations"], min=0,
                                      max=100, tooltip="Mean-field iterations.")
        self.crf_pos_w = FloatSpinBox(label="smoothness weight", value=defaults["pos_w"],
                                      min=0, max=100, step=0.5)
        self.crf_pos_xy_std = FloatSpinBox(label="smoothness σ (px)",
                                           value=defaults["pos_xy_std"], min=0.1, max=100,
                                           step=0.5)
        self.crf_bi_w = FloatSpinBox(label="appearance weight", value=defaults["bi_w"], min=0,
                                     max=100, step=0.5)
        self.crf_bi_xy_std = FloatSpinBox(label="appearance σ (px)", value=defaults["bi_xy_std"],
                                          min=0.1, max=1000, step=1)
        self.crf_bi_rgb_std = FloatSpinBox(label="colour σ (grey levels)",
                                           value=defaults["bi_rgb_std"], min=0.1, max=255,
                                           step=0.5)
        self.run_button, self.cancel_button = run_buttons(
            "Segment", "Segment the chosen layers in the background.")
        self.load_button = PushButton(text="Load model…",
                                      tooltip="Use a model saved before (.stego file).")
        self.model_label = text()
        self.status = text()
        self._fold, _ = collapsible("advanced (CRF settings)", [
            self.crf_backend, self.crf_iterations, self.crf_pos_w, self.crf_pos_xy_std,
            self.crf_bi_w, self.crf_bi_xy_std, self.crf_bi_rgb_std])
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        form = Container(widgets=[self.slices])
        super().__init__(widgets=[self.model_label, self.load_button, self.picker, form, self.crf,
                                  buttons, self.status], labels=False)
        insert_after(self, self.crf, self._fold)
        finish_layout(self)
        self._model_changed()
        self.run_button.changed.connect(self.segment)
        self.cancel_button.changed.connect(self.cancel)
        self.load_button.changed.connect(lambda: self.load_model())
        self.store.changed.connect(self._model_changed)
        self.picker.select_active()

    def crf_settings(self) -> dict:
        return dict(iterations=int(self.crf_iterations.value), pos_w=float(self.crf_pos_w.value),
                    pos_xy_std=float(self.crf_pos_xy_std.value), bi_w=float(self.crf_bi_w.value),
                    bi_xy_std=float(self.crf_bi_xy_std.value),
                    bi_rgb_std=float(self.crf_bi_rgb_std.value))

    # ----------------------------------------------------------------------- segment
    def segment(self):
        """Start segmenting in the background; returns the :class:`Job` (or ``None``)."""
        model = self.model
        try:
            if model is None:
                raise StegoError("no model yet: fit one with 'Fit STEGO' or press 'Load model…'")
            sources = self.picker.sources()
            use_crf = bool(self.crf.value)
            crf_config, backend = None, None
            if use_crf:
                crf = crf_module()
                crf_config = crf.CRFConfig(**self.crf_settings())
                backend = None if self.crf_backend.value == "auto" else self.crf_backend.value
        except StegoError as exc:
            notify_error(exc, "Segment")
            return None
        only_current = self.slices.value == CURRENT_SLICE
        summary = model_summary(model)
        dtype = labels_dtype(model.n_clusters)
        crf_meta = crf_metadata(crf_config, self.crf_backend.value) if use_crf else None
        plan = []  # (source, indices, clusters layer, crf layer or None)
        for src in sources:
            indices = [src.current_index(self.viewer)] if only_current else src.order(self.viewer)
            shape = (*src.lead, *src.size)
            axes, scale, unit = layer_geometry(src.first, len(shape))
            meta = dict(made_by="napari-stego Segment", source=[lyr.name for lyr in src.layers],
                        model=summary, model_origin=self.store.origin, complete=False,
                        **label_metadata(model.n_clusters, axes, scale, unit, None))
            clusters = output_layer(self.viewer, f"clusters:{src.name}", "labels",
                                    f"{src.name} clusters", shape, dtype, meta, src.first)
            refined = None
            if use_crf:
                refined = output_layer(self.viewer, f"crf:{src.name}", "labels",
                                       f"{src.name} CRF", shape, dtype,
                                       dict(meta, crf=crf_meta), src.first)
            plan.append((src, indices, clusters, refined))
        total = sum(len(p[1]) for p in plan)

        def segmentation(src, idx):
            """The core's segmentation of a layer (a stack: one for all slices), or of
            one slice of channel layers combined."""
            from ..segment import Segmentation

            kwargs = dict(crf=crf_config if use_crf else None, crf_backend=backend)
            if len(src.layers) == 1:
                layer = src.first
                axes = layer_geometry(layer, len(src.lead) + 2)[0]
                return Segmentation(model, layer_data(layer),
                                    axes=axes + ("C" if layer.rgb else ""), **kwargs)
            return Segmentation(model, src.image(idx), **kwargs)

        def work(progress, cancel):
            import numpy as np

            from ..labels import ids_of

            done = 0
            progress("segment", 0, total)
            for k, (src, indices, _, refined) in enumerate(plan):
                seg = None
                for idx in indices:
                    if cancel.is_set():
                        raise Cancelled(f"segmentation cancelled after {done} of {total} slices")
                    if seg is None or len(src.layers) > 1:
                        seg = segmentation(src, idx)
                    plane = int(np.ravel_multi_index(idx, src.lead)) if src.lead and \
                        len(src.layers) == 1 else 0
                    probs = seg.probabilities(plane)
                    labels = ids_of(probs, model.n_clusters)
                    crf_labels = None
                    if refined is not None:
                        crf_labels = ids_of(seg.refined(plane, probs), model.n_clusters)
                    done += 1
                    yield k, idx, labels, crf_labels
                    progress("segment", done, total)
            return done

        def on_yield(item) -> None:
            k, idx, labels, crf_labels = item
            _, _, clusters, refined = plan[k]
            _write(clusters, idx, labels)
            if refined is not None and crf_labels is not None:
                _write(refined, idx, crf_labels)

        def done(n) -> None:
            for src, indices, clusters, refined in plan:
                complete = len(indices) == len(src.indices())
                for layer in (clusters, refined):
                    if layer is not None:
                        layer.metadata["napari_stego"]["complete"] = complete
            self.status.value = f"segmented {n} slice(s)"

        def on_end(job) -> None:
            if job.error is not None and isinstance(job.error, Cancelled):
                self.status.value = ("cancelled: finished slices are kept, the rest of the "
                                     "layer is 0")

        return self._start_job("Segment", work, on_yield=on_yield, on_done=done, on_end=on_end)


def _write(layer, idx, values) -> None:
    """Fill one slice of an output layer (in the main thread) and redraw it."""
    layer.data[idx] = values
    layer.refresh()


def _crf_defaults() -> dict:
    try:
        from ..crf import CRFConfig

        c = CRFConfig()
        return dict(iterations=c.iterations, pos_w=c.pos_w, pos_xy_std=c.pos_xy_std, bi_w=c.bi_w,
                    bi_xy_std=c.bi_xy_std, bi_rgb_std=c.bi_rgb_std)
    except ImportError:  # the CRF module is optional here; ticking CRF will say so
        return dict(iterations=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
                    bi_rgb_std=3.0)
