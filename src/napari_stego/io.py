"""Image arrays in, backbone-ready RGB out: axes, dtypes and robust intensity scaling.

Knows nothing about torch or napari. Every public function returns new arrays and never
modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import StegoError


@dataclass(frozen=True)
class IntensityConfig:
    """How raw intensities become [0, 1] floats.

    ``uint8`` images are divided by 255 (photographs, already display-ready); every other
    dtype is stretched between robust ``percentiles`` computed over the finite pixels.
    """

    percentiles: tuple[float, float] = (0.5, 99.5)


def image_list(images) -> list[np.ndarray]:
    """Split what a user passes into a list of single 2D images.

    Parameters
    ----------
    images : ndarray or sequence of ndarray
        ``(H, W)`` grey, ``(H, W, 3|4)`` RGB(A), an ``(N, H, W)`` grey stack, an
        ``(N, H, W, 3|4)`` RGB stack, or a list of any of these single images.

    Returns
    -------
    list of ``(H, W)`` or ``(H, W, C)`` arrays (views, not copies).
    """
    if isinstance(images, np.ndarray) or hasattr(images, "__array__") and not isinstance(
        images, (list, tuple)
    ):
        arr = np.asarray(images)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
            return [arr]
        if arr.ndim in (3, 4):
            return [arr[i] for i in range(arr.shape[0])]
        raise StegoError(
            f"cannot read an image of shape {arr.shape}: pass (H, W), (H, W, 3), "
            "(N, H, W) or (N, H, W, 3) arrays, or a list of 2D images"
        )
    if isinstance(images, Sequence) and len(images) > 0:
        out = []
        for i, im in enumerate(images):
            arr = np.asarray(im)
            if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))):
                raise StegoError(
                    f"image {i} has shape {arr.shape}: each image in a list must be "
                    "(H, W) grey or (H, W, 3) RGB"
                )
            out.append(arr)
        return out
    raise StegoError("no images given: pass an array or a non-empty list of arrays")


def to_unit_range(image: np.ndarray, config: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """Scale intensities to float32 in [0, 1]; NaN and inf become 0.

    Parameters
    ----------
    image : (H, W) or (H, W, C) ndarray of any real dtype

    Returns
    -------
    (H, W) or (H, W, C) float32 ndarray in [0, 1]
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise StegoError(f"unsupported image dtype {arr.dtype}: use integer or float images")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.float32)
    lo, hi = np.percentile(arr[finite], config.percentiles)
    if hi <= lo:  # constant image (or nearly): keep it flat, mid-grey-free
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((arr - np.float32(lo)) * np.float32(scale), 0.0, 1.0).astype(np.float32)
    out[~finite] = 0.0
    return out


def to_rgb(image: np.ndarray, config: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """Map a grey or colour image to the 3 channels a backbone (and the CRF) expects.

    Grey (and single-channel) images are replicated to 3 channels; RGBA drops alpha.

    Returns
    -------
    (H, W, 3) float32 ndarray in [0, 1]
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2:
        unit = to_unit_range(arr, config)
        return np.repeat(unit[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return to_unit_range(arr, config)
    raise StegoError(
        f"image of shape {arr.shape} is neither grey (H, W) nor RGB (H, W, 3)"
    )


def to_uint8_rgb(image: np.ndarray, config: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """The same mapping as :func:`to_rgb`, as (H, W, 3) uint8 (for the CRF and overlays)."""
    return np.round(to_rgb(image, config) * 255.0).astype(np.uint8)
