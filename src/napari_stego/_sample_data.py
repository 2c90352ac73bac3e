"""napari sample-data contributions (offline): thin wrappers over :mod:`napari_stego.samples`."""

from __future__ import annotations

from . import samples


def immunohistochemistry():
    return [(samples.immunohistochemistry(), {"name": "immunohistochemistry", "rgb": True})]


def hubble_deep_field():
    return [(samples.hubble_deep_field(), {"name": "hubble deep field", "rgb": True})]


def texture_stack():
    images, labels = samples.texture_mosaics(n=6, size=192)
    return [
        (images, {"name": "texture mosaics"}),
        (labels, {"name": "texture classes (ground truth)"}, "labels"),
    ]
