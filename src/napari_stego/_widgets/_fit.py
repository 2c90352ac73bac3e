"""The *Fit STEGO* dock widget: fit a head + clusters on chosen Image layers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, PushButton, SpinBox

from ..errors import StegoError
from ._common import (
    JobMixin,
    collapsible,
    finish_layout,
    insert_after,
    load_model_job,
    model_store,
    notify_error,
    optional_path,
    run_buttons,
    text,
    warm_imports,
)
from ._layers import LayerPicker

if TYPE_CHECKING:
    import napari


def _backbone_choices():
    from ..backbones import list_backbones

    return list_backbones()


def _backbone_help() -> str:
    from ..backbones import get_spec, list_backbones

    return "\n".join(f"{n}: {get_spec(n).description}" for n in list_backbones())


def device_choices() -> list[str]:
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def _spread(indices: list, n: int) -> list:
    """At most ``n`` of ``indices``, evenly spread over the stack."""
    if len(indices) <= n:
        return indices
    picks = np.unique(np.linspace(0, len(indices) - 1, n).round().astype(int))
    return [indices[i] for i in picks]


class FitWidget(Container, JobMixin):
    """Fit STEGO on one or more Image layers.

    The chosen layers (2D, RGB, or stacks) go through :meth:`napari_stego.StegoModel.fit`
    as sources with their axes (:func:`fit_sources`: one intensity mapping per layer,
    features through the cache), in a background thread; progress shows in the tool (its
    progress bar and status line). The fitted model is shared with the other napari-stego
    widgets of this viewer (``model_store(viewer).model``, or this widget's ``.model``).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        from ..train import TrainConfig

        warm_imports()
        self.viewer = napari_viewer
        self.store = model_store(napari_viewer)
        self.picker = LayerPicker(napari_viewer, label="Images to fit on")
        self.backbone = ComboBox(
            label="backbone", choices=_backbone_choices(), value="dino_vits8",
            tooltip="The frozen feature extractor. DINO ViT-S/8 is STEGO's default (weights "
                    "come from the Hugging Face cache, or a local file below); "
                    "efficientnet_lite0 works offline with no download.\n\n" + _backbone_help())
        self.weights = FileEdit(
            label="weights file", mode="r", value=None, nullable=True,
            filter="Weights (*.pth *.pt *.safetensors)",
            tooltip="Optional: a local backbone checkpoint (.pth / .safetensors), e.g. "
                    "dino_deitsmall8_pretrain.pth, for machines without a network.")
        from .. import DEFAULT_N_CLUSTERS

        self.n_clusters = SpinBox(label="clusters (K)", value=DEFAULT_N_CLUSTERS, min=2, max=254,
                                  tooltip="How many classes to find ('Suggest K' scores a "
                                          "range on a fitted model).")
        self.steps = SpinBox(
            label="training steps", value=TrainConfig().steps, min=1, max=100_000,
            tooltip="Head training steps. About 0.13 s each on a 2-core CPU (batch 16), far less on a "
                    "GPU. 500 was measured on four datasets; a few hundred give a first look.")
        self.code_dim = SpinBox(label="code dim", value=TrainConfig().code_dim, min=2, max=512,
                                tooltip="Dimension of the STEGO codes (70 in the paper).")
        self.batch_size = SpinBox(label="batch size", value=TrainConfig().batch_size, min=1,
                                  max=256, tooltip="Training windows per step (16 in the paper); "
                                                   "lower it if memory runs out.")
        self.max_slices = SpinBox(
            label="max slices / layer", value=64, min=1, max=100_000,
            tooltip="Stacks: fit on at most this many slices per layer, evenly spread (features "
                    "of every used slice are kept in memory).")
        from ..tiling import TileConfig

        self.tile_size = SpinBox(
            label="tile size (px)", value=0, min=0, max=16_384, step=64,
            tooltip="Images larger than this go through the backbone tile by tile (with a "
                    "halo, so tiles join seamlessly); smaller images are processed whole. "
                    "0: the backbone's default (1024 px; 64 patches for a ViT). "
                    "Lower it if the GPU / RAM runs out. Stored in the model and used when "
                    "segmenting.")
        self.upsample = ComboBox(
            label="up-sample", choices=[1, 2, 4], value=1,
            tooltip="Run the backbone on images up-sampled this many times: features every "
                    "stride / N pixels, for structures thinner than the backbone's stride "
                    "(membranes, small nuclei); N^2 times the backbone's time and memory. "
                    "Stored in the model and used when segmenting.")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto",
                               tooltip="'auto' picks a CUDA GPU, then Apple MPS, then the CPU.")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1,
                            tooltip="Same seed, same data, same CPU: same model.")
        self.run_button, self.cancel_button = run_buttons(
            "Fit", "Fit STEGO on the chosen layers in the background (the viewer stays usable).")
        self.save_button = PushButton(text="Save model…", enabled=False,
                                      tooltip="Write the fitted model to a .stego file.")
        self.load_button = PushButton(text="Load model…",
                                      tooltip="Read a model saved before (.stego file).")
        self.status = text()
        self.model_label = text()
        self.summary = text()  # cluster shares of the last fit
        from ._plots import themed_canvas

        self.summary_figure, self.summary_canvas = themed_canvas(
            napari_viewer, (3.6, 1.5), lambda: self._draw_summary(), min_height=130)
        self.summary_canvas.setVisible(False)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        files = Container(widgets=[self.save_button, self.load_button], layout="horizontal",
                          labels=False)
        form = Container(widgets=[self.backbone, self.weights, self.n_clusters, self.steps])
        self._fold, _ = collapsible("advanced", [self.code_dim, self.batch_size, self.max_slices,
                                                 self.tile_size, self.upsample, self.device,
                                                 self.seed])
        super().__init__(widgets=[self.picker, form, buttons, self.status, self.summary,
                                  self.model_label, files], labels=False)
        insert_after(self, form, self._fold)
        insert_after(self, self.summary, self.summary_canvas)
        finish_layout(self)
        self.run_button.changed.connect(self.fit)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(lambda: self.save_model())
        self.load_button.changed.connect(lambda: self.load_model())
        self.store.changed.connect(self._model_changed)
        self.picker.select_active()
        self._model_changed(self.store.model)

    # ----------------------------------------------------------------------- state
    @property
    def model(self):
        """The current model of this viewer (``None`` until one is fitted or loaded)."""
        return self.store.model

    def _model_changed(self, model) -> None:
        self.model_label.value = f"<b>Model:</b> {self.store.describe()}"
        self.save_button.enabled = model is not None
        self._draw_summary()

    # ------------------------------------------------------------------------- fit
    def fit(self):
        """Start fitting in the background; returns the :class:`Job` (or ``None``)."""
        from ..train import TrainConfig

        try:
            sources = self.picker.sources()
        except StegoError as exc:
            notify_error(exc, "Fit STEGO")
            return None
        per_layer = int(self.max_slices.value)
        plan = [(src, _spread(src.indices(), per_layer)) for src in sources]
        backbone, n_clusters = self.backbone.value, int(self.n_clusters.value)
        weights = optional_path(self.weights.value)
        train = TrainConfig(steps=int(self.steps.value), batch_size=int(self.batch_size.value),
                            code_dim=int(self.code_dim.value))
        device, seed = self.device.value, int(self.seed.value)
        from ..tiling import TileConfig

        tiles = TileConfig(tile=int(self.tile_size.value) or None)
        from ..features import FeatureConfig

        features = FeatureConfig(upsample=int(self.upsample.value))
        names = ", ".join(src.name for src in sources)
        n_images = sum(len(idx) for _, idx in plan)

        def work(progress, cancel):
            from ..model import StegoModel

            images = fit_sources(plan, cancel)
            return StegoModel.fit(images, n_clusters, backbone=backbone, weights=weights,
                                  device=device, seed=seed, train=train, tiles=tiles,
                                  features=features, progress=progress, cancel=cancel,
                                  on_loss=lambda step, loss: progress("train", step, train.steps,
                                                                      loss=loss))

        def done(model) -> None:
            from napari.utils.notifications import show_info

            plural = "image" if n_images == 1 else "images"
            self.store.set(model, f"fitted on {names} ({n_images} {plural})")
            self.status.value = f"fitted on {n_images} {plural}, K = {model.n_clusters}"
            self._draw_summary()
            for warning in model.info.get("warnings", []):
                from napari.utils.notifications import show_warning

                self.status.value += " (warning: see notification)"
                show_warning(f"STEGO fit: {warning}")
            show_info(f"STEGO fitted: {model!r}. Apply it with the 'Segment' widget "
                      "(Layers > Segment > Segment with STEGO).")

        return self._start_job("Fit STEGO", work, on_done=done)

    def _draw_summary(self) -> None:
        """Cluster shares and the loss curve of the current model's fit (hidden when the
        model has none, e.g. one saved by an older version)."""
        from ._plots import draw_fit_summary, fit_summary_text

        info = dict(self.model.info) if self.model is not None else {}
        if self.model is not None:
            info.setdefault("steps", self.model.train_config.steps)
        self.summary.value = fit_summary_text(info)
        self.summary_canvas.setVisible(bool(info.get("cluster_shares")))
        draw_fit_summary(self.summary_figure, self.viewer, info)
        self.summary_canvas.draw_idle()

    # ----------------------------------------------------------------- save / load
    def save_model(self, path: str | Path | None = None) -> Path | None:
        """Write the current model to ``path`` (asks with a file dialog when ``None``)."""
        from napari.utils.notifications import show_info

        if self.model is None:
            notify_error(StegoError("no model to save: fit one first"), "Save model")
            return None
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(self.native, "Save STEGO model", "model.stego",
                                                  "STEGO model (*.stego)")
            if not path:
                return None
        try:
            out = self.model.save(path)
        except (OSError, StegoError) as exc:
            notify_error(StegoError(f"cannot write {path}: {exc}"), "Save model")
            return None
        self.store.origin = f"saved as {Path(out).name}"
        self._model_changed(self.model)
        show_info(f"model saved to {out}")
        return out

    def load_model(self, path: str | Path | None = None):
        """Read a model in the background (file dialog when ``path`` is ``None``); it
        becomes the model of every napari-stego widget of this viewer. Returns the job."""
        return load_model_job(self, path, weights=self.weights.value, device=self.device.value)


def fit_sources(plan, cancel) -> list:
    """What the Fit widget passes to ``StegoModel.fit``: each single layer as one source with
    its axes (its chosen slices, lazily: one intensity mapping per layer, features through
    the cache, as Python callers get); layers combined as channels as their slices' images
    (each mapped on its own)."""
    import dask.array as da

    from ..io import open_image
    from ._layers import layer_data, layer_geometry

    out: list = []
    for src, indices in plan:
        if cancel.is_set():
            from ..errors import Cancelled

            raise Cancelled("cancelled while reading images")
        if len(src.layers) > 1:
            out.extend(src.image(idx) for idx in indices)
            continue
        layer = src.first
        data = layer_data(layer)
        axes = layer_geometry(layer, len(src.lead) + 2)[0]
        if src.lead and len(indices) < len(src.indices()):  # a spread of the slices
            data = da.stack([da.asarray(data[idx]) for idx in indices])
            axes = "Z" + axes[len(src.lead):]
        out.append(open_image(data, axes + ("C" if layer.rgb else ""), name=layer.name))
    return out
