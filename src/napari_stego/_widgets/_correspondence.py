"""The *Feature correspondences* dock widget (the STEGO paper's Fig. 2).

Click a point of an image: a new image layer shows how similar (cosine) that point's
backbone features — or STEGO codes — are to every location of the same image and of its
nearest-neighbour slices. It shows, before any fitting, whether the features see the
structure a user cares about.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, PushButton, SpinBox
from qtpy.QtWidgets import QListWidget, QListWidgetItem

from ..errors import Cancelled, StegoError
from ..io import META_KEY
from ..similarity import descriptor, nearest, query_vector, similarity_map
from ._common import (
    JobMixin,
    collapsible,
    finish_layout,
    insert_after,
    model_store,
    model_summary,
    notify_error,
    optional_path,
    run_buttons,
    text,
    warm_imports,
)
from ._layers import find_output, layer_source, output_layer
from ._fit import _spread, device_choices

if TYPE_CHECKING:
    import napari

CODES = "codes"
_CACHE_MAPS = 24


def _source_choices(_widget=None):
    from ..backbones import list_backbones

    names = [(f"{n} features", n) for n in list_backbones()]
    return [("STEGO codes (fitted model)", CODES), *names]


class CorrespondenceWidget(Container, JobMixin):
    """Cosine-similarity maps of a clicked point's features (Fig. 2 of the STEGO paper).

    Press *Pick a point*, then click in the image (the query points layer is in add mode).
    For a stack, the ``neighbours`` slices whose mean features are closest to the clicked
    slice's are shown too and listed below (click one to go there). From the console:
    ``widget.query((z, y, x))`` in the image layer's data coordinates.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        warm_imports()
        self.viewer = napari_viewer
        self.store = model_store(napari_viewer)
        self.image = ComboBox(label="image", choices=self._image_choices,
                              tooltip="The Image layer to explore (grey, RGB or a stack).")
        model = self.store.model
        self.source = ComboBox(
            label="compare", choices=_source_choices,
            value=model.backbone.spec.name if model is not None else "dino_vits8",
            tooltip="Raw backbone features (before fitting: do they separate what you care "
                    "about?) or the fitted model's STEGO codes.")
        self.weights = FileEdit(label="weights file", mode="r", value=None, nullable=True,
                                filter="Weights (*.pth *.pt *.safetensors)",
                                tooltip="Optional local backbone checkpoint (offline machines).")
        self.neighbours = SpinBox(label="neighbour slices", value=3, min=0, max=16,
                                  tooltip="Stacks: also show the maps on this many slices most "
                                          "similar to the clicked one.")
        self.candidates = SpinBox(label="search among (slices)", value=32, min=1, max=10_000,
                                  tooltip="Stacks: look for neighbours among at most this many "
                                          "slices, evenly spread (each needs its features once).")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.pick_button = PushButton(text="Pick a point",
                                      tooltip="Adds a query Points layer in 'add' mode: click a "
                                              "location in the image.")
        self.run_button, self.cancel_button = run_buttons(
            "Update", "Recompute the maps for the current query point.")
        self.status = text()
        self.neighbour_list = QListWidget()
        self.neighbour_list.setMaximumHeight(110)
        self.neighbour_list.itemClicked.connect(self._go_to)
        self._fold, _ = collapsible("advanced", [self.weights, self.candidates, self.device])
        buttons = Container(widgets=[self.pick_button, self.run_button, self.cancel_button],
                            layout="horizontal", labels=False)
        form = Container(widgets=[self.image, self.source, self.neighbours])
        self._list_title = text("Nearest slices (click one to view it):")
        super().__init__(widgets=[form, buttons, self.status, self._list_title], labels=False)
        insert_after(self, form, self._fold)
        insert_after(self, self._list_title, self.neighbour_list)
        finish_layout(self)
        self.pick_button.changed.connect(self.pick)
        self.run_button.changed.connect(lambda: self.query())
        self.cancel_button.changed.connect(self.cancel)
        ev = napari_viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.moved):
            e.connect(lambda _e=None: self.image.reset_choices())
        active = napari_viewer.layers.selection.active
        if active is not None and any(active is v for _, v in self._image_choices()):
            self.image.value = active
        self._maps: OrderedDict = OrderedDict()   # (layer id, idx, source) -> (D, h, w)
        self._descs: dict = {}                    # (layer id, idx, source) -> (D,)
        self._backbones: dict = {}
        self._point = None
        self._guard = False
        self.last: dict | None = None             # the last result (maps, neighbours, point)

    def _image_choices(self, _widget=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and META_KEY not in layer.metadata]

    # ------------------------------------------------------------------- the point
    def points_layer(self):
        """The query Points layer of the chosen image (made on first use)."""
        image = self.image.value
        if image is None:
            raise StegoError("no image layer: open an image first")
        key = f"query:{image.name}"
        layer = find_output(self.viewer, key)
        if layer is None:
            h, w = layer_source(image).size
            layer = self.viewer.add_points(
                ndim=image.ndim, name=f"{image.name} query", face_color="#00e5ff",
                border_color="white", symbol="cross", size=max(4, min(h, w) // 25),
                scale=image.scale, translate=image.translate,
                metadata={META_KEY: dict(output_key=key, made_by="napari-stego correspondences")})
            layer.events.data.connect(self._points_changed)
        return layer

    def pick(self) -> None:
        """Put the query layer on top in 'add' mode: the next click sets the point."""
        try:
            layer = self.points_layer()
        except StegoError as exc:
            notify_error(exc, "Feature correspondences")
            return
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
        self.status.value = "click a location in the image"

    def _points_changed(self, event) -> None:
        if self._guard:
            return
        action = str(getattr(event, "action", "added"))
        if "added" not in action.lower() and "changed" not in action.lower():
            return
        layer = event.source
        if len(layer.data) == 0:
            return
        point = np.asarray(layer.data[-1])
        if len(layer.data) > 1:  # keep one query point
            self._guard = True
            try:
                layer.data = point[None]
            finally:
                self._guard = False
        self.query(point)

    # ----------------------------------------------------------------------- query
    def query(self, point=None):
        """Compute the maps for ``point`` (image data coordinates, stack axes first); the
        last point when ``None``. Returns the :class:`Job` (or ``None``)."""
        image = self.image.value
        try:
            if image is None:
                raise StegoError("no image layer: open an image first")
            src = layer_source(image)
            if point is None:
                point = self._point
            if point is None:
                raise StegoError("no query point yet: press 'Pick a point' and click in the image")
            point = np.asarray(point, dtype=float)
            if point.size != len(src.lead) + 2:
                raise StegoError(f"a point of {image.name!r} has {len(src.lead) + 2} coordinates, "
                                 f"got {point.size}")
            source = self.source.value
            model = self.store.model
            if source == CODES and model is None:
                raise StegoError("STEGO codes need a fitted model: fit or load one first, or "
                                 "compare a backbone's features")
        except StegoError as exc:
            notify_error(exc, "Feature correspondences")
            return None
        self._point = point
        n = len(src.lead)
        idx = tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(point[:n], src.lead))
        yx = (float(np.clip(point[n], 0, src.size[0] - 1)),
              float(np.clip(point[n + 1], 0, src.size[1] - 1)))
        k = int(self.neighbours.value) if n else 0
        candidates = _spread(src.indices(), int(self.candidates.value)) if k else []
        weights = optional_path(self.weights.value)
        device = self.device.value
        layer_id = id(image.data)

        def feature_map(index):
            key = (layer_id, index, source, weights)
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
            fmap = self._compute(src.image(index), source, weights, device, model)
            self._maps[key] = fmap
            while len(self._maps) > _CACHE_MAPS:
                self._maps.popitem(last=False)
            self._descs[key] = descriptor(fmap)
            return fmap

        def work(progress, cancel):
            stride, min_side = self._geometry(source, weights, model)
            todo = [idx] + [c for c in candidates if c != idx
                            and (layer_id, c, source, weights) not in self._descs]
            progress("correspond", 0, len(todo) + k)
            fmap = feature_map(idx)
            q = query_vector(fmap, yx, src.size, stride, min_side)
            maps = {idx: similarity_map(fmap, q, src.size, stride, min_side)}
            for i, c in enumerate(todo[1:]):
                if cancel.is_set():
                    raise Cancelled("cancelled")
                feature_map(c)
                progress("correspond", i + 2, len(todo) + k)
            descs = {c: self._descs[(layer_id, c, source, weights)] for c in candidates
                     if (layer_id, c, source, weights) in self._descs}
            near = nearest(self._descs[(layer_id, idx, source, weights)], descs, k, exclude=idx)
            for i, (c, _score) in enumerate(near):
                if cancel.is_set():
                    raise Cancelled("cancelled")
                maps[c] = similarity_map(feature_map(c), q, src.size, stride, min_side)
                progress("correspond", len(todo) + i + 1, len(todo) + k)
            return dict(maps=maps, neighbours=near, index=idx, point=yx)

        def done(result) -> None:
            self.last = result
            self._show(image, src, result, source)

        return self._start_job("Feature correspondences", work, on_done=done)

    def _backbone(self, name, weights, device):
        from ..backbones import create_backbone
        from ..device import resolve_device

        key = (name, weights, str(device))
        if key not in self._backbones:
            self._backbones.clear()  # one backbone at a time (they are big)
            self._backbones[key] = create_backbone(name, weights).to(resolve_device(device))
        return self._backbones[key]

    def _geometry(self, source, weights, model):
        from ..backbones import get_spec
        from ..features import FeatureConfig

        if source == CODES:
            return model.backbone.stride, model.feature_config.min_side
        return get_spec(source).stride, FeatureConfig().min_side

    def _compute(self, image, source, weights, device, model):
        """Backbone features or codes ``(D, h, w)`` of one image (in the worker thread)."""
        if source == CODES:
            return model.codes(image)
        if model is not None and weights is None and model.backbone.spec.name == source:
            return model.features(image)
        from ..device import resolve_device
        from ..features import FeatureConfig, extract_features

        net = self._backbone(source, weights, device)
        return extract_features(net, image, FeatureConfig(), resolve_device(device))

    # ---------------------------------------------------------------------- display
    def _show(self, image, src, result, source) -> None:
        shape = (*src.lead, *src.size)
        what = "STEGO codes" if source == CODES else f"{source} features"
        meta = dict(made_by="napari-stego correspondences", source=[image.name], compare=what,
                    point=[*result["index"], *result["point"]],
                    neighbours=[[list(c), s] for c, s in result["neighbours"]])
        if source == CODES and self.store.model is not None:
            meta["model"] = model_summary(self.store.model)
        layer = output_layer(self.viewer, f"similarity:{image.name}", "image",
                             f"{image.name} similarity", shape, np.float32, meta, image,
                             colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.75,
                             blending="translucent")
        for idx, sim in result["maps"].items():
            layer.data[idx] = sim
        # stretch from the low end of the computed maps to 1 (features are rarely anti-similar)
        low = float(np.percentile(np.stack(list(result["maps"].values())), 2))
        layer.contrast_limits = (min(max(low, -1.0), 0.95), 1.0)
        layer.refresh()
        query = find_output(self.viewer, f"query:{image.name}")
        if query is not None:  # keep the query point visible above the map
            layers = self.viewer.layers
            layers.move(layers.index(query), len(layers))
        self.neighbour_list.clear()
        for idx, score in result["neighbours"]:
            item = QListWidgetItem(f"slice {', '.join(map(str, idx))}  (similarity {score:.2f})")
            item.setData(256, idx)
            self.neighbour_list.addItem(item)
        sim_here = result["maps"][result["index"]]
        self.status.value = (f"{what}: {len(result['maps'])} map(s); similarity here "
                             f"{sim_here.min():.2f}…{sim_here.max():.2f}")

    def _go_to(self, item) -> None:
        idx = item.data(256)
        image = self.image.value
        if image is None or idx is None:
            return
        world = image.data_to_world(list(idx) + [0, 0])
        offset = self.viewer.dims.ndim - image.ndim
        for i, value in enumerate(world[: len(idx)]):
            self.viewer.dims.set_point(offset + i, value)
