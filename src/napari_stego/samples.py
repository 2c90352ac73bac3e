"""Sample images that work offline (scikit-image's bundled files and synthetic stacks).

Napari-free; the napari sample-data contributions and the CLI demo both use these.
"""

from __future__ import annotations

import numpy as np


def texture_mosaics(n: int = 6, size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey stack of two-texture images (brick / grass / gravel) with its class map.

    Returns
    -------
    images : (n, size, size) uint8 ndarray
    labels : (n, size, size) uint8 ndarray, class ids 0 (brick), 1 (grass), 2 (gravel)
    """
    from skimage import data

    if not 16 <= size <= 512:
        raise ValueError(f"size must lie in [16, 512], got {size}")
    rng = np.random.default_rng(seed)
    textures = [data.brick(), data.grass(), data.gravel()]
    images = np.empty((n, size, size), np.uint8)
    labels = np.empty((n, size, size), np.uint8)
    for i in range(n):
        a, b = i % 3, (i + 1) % 3
        y0, x0 = rng.integers(0, 512 - size + 1, 2)
        split = int(rng.integers(size // 3, 2 * size // 3 + 1))
        images[i] = textures[a][y0:y0 + size, x0:x0 + size]
        images[i, :, split:] = textures[b][y0:y0 + size, x0:x0 + size][:, split:]
        labels[i] = a
        labels[i, :, split:] = b
    return images, labels


def immunohistochemistry() -> np.ndarray:
    """Human colon tissue, IHC stained (hematoxylin + DAB), ``(512, 512, 3)`` uint8."""
    from skimage import data

    return data.immunohistochemistry()


def hubble_deep_field() -> np.ndarray:
    """Hubble eXtreme Deep Field crop, ``(872, 1000, 3)`` uint8."""
    from skimage import data

    return data.hubble_deep_field()
