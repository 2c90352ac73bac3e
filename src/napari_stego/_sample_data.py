"""napari sample-data contributions (offline): thin wrappers over :mod:`napari_stego.samples`."""

from __future__ import annotations

from . import samples


def immunohistochemistry():
    return [(samples.immunohistochemistry(), {"name": "immunohistochemistry", "rgb": True})]


def hubble_deep_field():
    return [(samples.hubble_deep_field(), {"name": "hubble deep field", "rgb": True})]


def texture_stack():
    """Six two-texture images and their classes; in the Labels layer 0 is 'unlabelled'
    (napari's convention), so brick, grass and gravel are labels 1, 2 and 3."""
    images, labels = samples.texture_mosaics(n=6, size=192)
    return [
        (images, {"name": "texture mosaics"}),
        (labels + 1, {"name": "texture classes (ground truth)",
                      "metadata": {"classes": {1: "brick", 2: "grass", 3: "gravel"}}}, "labels"),
    ]
