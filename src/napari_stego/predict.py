"""Codes -> per-pixel cluster probabilities (the reference's cluster probe at inference)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import StegoError


@dataclass(frozen=True)
class PredictConfig:
    """``alpha``: softmax temperature on cosine similarities (2, as the reference)."""

    alpha: float = 2.0

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a <= 0:
            raise StegoError(f"PredictConfig.alpha must be a finite number > 0, got {a!r}")


def upsample_code(code: torch.Tensor, stride: int, work_size: tuple[int, int],
                  out_size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly up-sample a code to image pixels.

    Args:
        code: ``(B, K, h, w)`` on the backbone grid of an image of ``work_size`` pixels (the
            grid covers ``(h * stride, w * stride)``, the padded work image).
        out_size: the original image size ``(H, W)`` (may differ when the image was up-sampled
            for the backbone).

    Returns:
        ``(B, K, H, W)``.
    """
    h, w = code.shape[-2:]
    up = F.interpolate(code, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    up = up[..., : work_size[0], : work_size[1]]
    if tuple(work_size) != tuple(out_size):
        up = F.interpolate(up, size=out_size, mode="bilinear", align_corners=False)
    return up


def cluster_probabilities(code: torch.Tensor, centroids: torch.Tensor, alpha: float = 2.0,
                          colour: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(alpha * cos(code, centroid_k))`` over clusters.

    Args:
        code: ``(B, C, H, W)``.
        centroids: ``(K, C)``.
        colour: for a model that clusters codes with colours
            (:class:`~napari_stego.appearance.ColourSpace`): the colour part of the scores
            ``(B, K, H, W)``, added to ``code/|code| . centroids`` (``centroids`` is then the
            weighted code part, used as it is, not normalised).

    Returns:
        ``(B, K, H, W)`` probabilities.
    """
    unit = F.normalize(code, dim=1)
    if colour is None:
        cos = torch.einsum("bchw,kc->bkhw", unit, F.normalize(centroids, dim=1))
    else:
        cos = torch.einsum("bchw,kc->bkhw", unit, centroids.to(unit)) + colour.to(unit)
    return torch.softmax(alpha * cos, dim=1)
