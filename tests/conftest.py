"""Shared fixtures: the offline backbone and small synthetic texture images."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def offline_backbone():
    from napari_stego.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def mosaics():
    """Six 160 px grey two-texture images and their class maps."""
    from napari_stego.samples import texture_mosaics

    images, labels = texture_mosaics()
    return list(images), list(labels)
