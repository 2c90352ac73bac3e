"""Dense backbone features of whole images, computed once and kept for training and prediction.

``extract_features`` runs one image through a :class:`~napari_stego.backbones.Backbone`; small
images are first up-sampled so their shorter side reaches ``min_side`` pixels (the reference
trains at 224 px), so a 120 px blood-cell crop still gives a usable feature grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Backbone
from .errors import Cancelled
from .io import IntensityConfig, to_rgb

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FeatureConfig:
    """How images become feature maps.

    ``min_side``: images whose shorter side is smaller are up-sampled (bilinear) to it.
    ``dtype``: storage type of cached features (float16 halves memory).
    """

    min_side: int = 224
    dtype: str = "float16"
    intensity: IntensityConfig = IntensityConfig()


def backbone_input(image: np.ndarray, config: FeatureConfig) -> torch.Tensor:
    """One image -> ``(1, 3, H', W')`` float32 in [0, 1], up-sampled to ``min_side`` if smaller."""
    rgb = torch.from_numpy(to_rgb(image, config.intensity)).permute(2, 0, 1)[None]
    h, w = rgb.shape[-2:]
    short = min(h, w)
    if short < config.min_side:
        scale = config.min_side / short
        size = (max(round(h * scale), 1), max(round(w * scale), 1))
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return rgb


@torch.inference_mode()
def extract_features(backbone: Backbone, image: np.ndarray, config: FeatureConfig = FeatureConfig(),
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Features of one image.

    Args:
        backbone: a frozen backbone (moved to ``device`` by the caller).
        image: ``(H, W)`` or ``(H, W, C)`` array, any real dtype.

    Returns:
        ``(D, h, w)`` tensor on the CPU in ``config.dtype``, ``h = ceil(H'/stride)`` for the
        (possibly up-sampled) height ``H'``.
    """
    x = backbone.normalize(backbone_input(image, config).to(device))
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        feats = backbone(x)[0]
    return feats.to("cpu", getattr(torch, config.dtype))


def extract_all(backbone: Backbone, images: Sequence[np.ndarray], config: FeatureConfig,
                device: torch.device | str, progress: Progress | None = None,
                cancel=None) -> list[torch.Tensor]:
    """:func:`extract_features` for each image, reporting ``("features", i, n)``."""
    out = []
    for i, image in enumerate(images):
        if cancel is not None and cancel.is_set():
            raise Cancelled("feature extraction cancelled")
        out.append(extract_features(backbone, image, config, device))
        if progress is not None:
            progress("features", i + 1, len(images))
    return out
