"""Shared fixtures: the offline backbone and small synthetic texture images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def offline_backbone():
    from napari_stego.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


def texture_mosaics(n: int = 6, size: int = 160, seed: int = 0):
    """Grey two-texture images (brick / grass / gravel halves) and their class maps."""
    rng = np.random.default_rng(seed)
    textures = [data.brick(), data.grass(), data.gravel()]
    images, labels = [], []
    for i in range(n):
        a, b = i % 3, (i + 1) % 3
        y0, x0 = rng.integers(0, 512 - size, 2)
        split = int(rng.integers(size // 3, 2 * size // 3))
        im = textures[a][y0:y0 + size, x0:x0 + size].copy()
        im[:, split:] = textures[b][y0:y0 + size, x0:x0 + size][:, split:]
        lab = np.full((size, size), a, np.uint8)
        lab[:, split:] = b
        images.append(im)
        labels.append(lab)
    return images, labels


@pytest.fixture(scope="session")
def mosaics():
    return texture_mosaics()
