"""The layers napari-stego widgets read and write: images to process (:class:`Source`, from
one Image layer or from grey layers used as channels, picked in a :class:`LayerPicker`) and
the Labels / Image layers they make (:func:`output_layer`), found again by metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from magicgui.widgets import CheckBox, Container, Select

from ..errors import StegoError
from ..io import META_KEY
from ..labels import labels_dtype  # noqa: F401  (the one labels dtype, for the widgets)
from ._common import text


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
        from ..intensity import to_unit_range

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


layer_data = _data


def layer_geometry(layer, ndim: int) -> tuple[str, list[float], str | None]:
    """``(axes, scale, unit)`` of the ``ndim`` displayed (non-RGB) axes of an Image layer,
    for the labels made from it: its axis labels when they are letters (else ``YX``,
    ``ZYX``, ``TZYX``), its scale, and its unit (``None`` for pixels)."""
    names = [str(a).upper() for a in getattr(layer, "axis_labels", ())][-ndim:]
    if not (len(names) == ndim and all(len(a) == 1 and a in "TZQINYX" for a in names)
            and len(set(names)) == ndim and names[-2:] == ["Y", "X"]):
        names = list({2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "TZQIN"[:ndim - 2] + "YX"))
    scale = [float(s) for s in tuple(layer.scale)[-ndim:]]
    units = [str(u) for u in (getattr(layer, "units", None) or ())]
    unit = next((u for u in reversed(units) if u not in ("pixel", "")), None)
    if unit in ("micrometer", "micron", "um"):
        unit = "µm"
    return "".join(names), scale, unit


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


