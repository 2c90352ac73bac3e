"""Codes -> per-pixel cluster probabilities (the reference's cluster probe at inference).

The codes live on the backbone's feature grid (one cell per ``stride`` pixels). The cluster
scores (cosines to the centroids, plus a colour part for models that cluster with colours)
are computed per cell and brought to the pixels by :func:`guided_upsample`: each pixel takes
its neighbouring cells' scores, weighted by distance and by how well the pixel's colour fits
each cell's colours, so a boundary between clusters follows the image's edges instead of
the grid's bilinear ramps (the idea of joint bilateral up-sampling, Kopf et al., SIGGRAPH
2007). Model files from before it up-sample the codes bilinearly (:func:`upsample_code`,
``PredictConfig.guide = None``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .appearance import cell_moments
from .errors import StegoError


@dataclass(frozen=True)
class PredictConfig:
    """``alpha``: softmax temperature on cosine similarities (2, as the reference).
    ``guide``: the colour noise floor of :func:`guided_upsample` (``sigma``, in the [0, 1]
    units of the intensity mapping); ``None`` up-samples the codes bilinearly instead (model
    files from before the guided up-sampling load with ``None``)."""

    alpha: float = 2.0
    guide: float | None = 0.05

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a <= 0:
            raise StegoError(f"PredictConfig.alpha must be a finite number > 0, got {a!r}")
        g = self.guide
        if g is not None and (isinstance(g, bool) or not isinstance(g, numbers.Real)
                              or not math.isfinite(g) or g <= 0):
            raise StegoError(f"PredictConfig.guide must be None or a finite number > 0, got {g!r}")


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
    return torch.softmax(alpha * cluster_scores(code, centroids, colour), dim=1)


def cluster_scores(code: torch.Tensor, centroids: torch.Tensor,
                   colour: torch.Tensor | None = None) -> torch.Tensor:
    """The scores :func:`cluster_probabilities` takes the softmax of: ``(B, K, H, W)`` cosines
    of ``code (B, C, H, W)`` to ``centroids (K, C)``, plus ``colour`` when given (see there)."""
    unit = F.normalize(code, dim=1)
    if colour is None:
        return torch.einsum("bchw,kc->bkhw", unit, F.normalize(centroids, dim=1).to(unit))
    return torch.einsum("bchw,kc->bkhw", unit, centroids.to(unit)) + colour.to(unit)


def guided_upsample(scores: torch.Tensor, means: torch.Tensor, spread: torch.Tensor,
                    rgb: torch.Tensor, stride: int, sigma: float, *,
                    cells: tuple[int, int] = (0, 0), pixels: tuple[int, int] = (0, 0),
                    radius: int = 1) -> torch.Tensor:
    """Up-sample scores on the feature grid to pixels, guided by the pixels' colours.

    Every pixel's value is a weighted mean of the scores of the cells within ``radius``
    cells of its own (clamped at the grid's edge), with weights

    ``exp(-d^2 / 2) * N(c; mu_q, (sigma^2 + v_q) I)``,

    ``d`` the distance (in cells) from the pixel to the centre of cell ``q``, ``c`` the
    pixel's colour and ``N`` the isotropic Gaussian density of colours around the cell's mean
    colour ``mu_q`` with variance ``sigma^2 + v_q`` in each channel, ``v_q`` the cell's own
    colour variance summed over the channels and ``sigma`` a noise floor (so a cell that
    straddles an edge accepts colours of either side). A pixel at an edge thus takes the
    scores of the cells whose colours it shares; inside a cell of one colour the weights are
    spatial alone. A band of pixels (``pixels``) with the cells around it (``cells``, one
    cell of margin or the grid's edge) gives the values of the whole map there.

    Args:
        scores: ``(B, K, n, m)`` on cells ``[cells[0], cells[0] + n) x [cells[1], cells[1] + m)``.
        means: ``(B, 3, n, m)`` the cells' mean colours; ``spread``: ``(B, 1, n, m)`` their
            colour variance summed over the channels
            (:func:`~napari_stego.appearance.cell_moments`).
        rgb: ``(B, 3, P, Q)`` the colours of work-image pixels
            ``[pixels[0], pixels[0] + P) x [pixels[1], pixels[1] + Q)``, in [0, 1].
        stride: work-image pixels per cell.
        sigma: the colour noise floor (``PredictConfig.guide``).

    Returns:
        ``(B, K, P, Q)``.
    """
    n, m = scores.shape[-2:]
    rgb = rgb.to(scores)
    var = float(sigma) ** 2 + spread.to(scores)
    log_norm = 1.5 * torch.log(var)  # the density's normaliser in three channels
    means = means.to(scores)

    def axis(start: int, size: int):
        """Each pixel's own cell and its position in cell units (cell centres at integers)."""
        px = torch.arange(start, start + size, device=scores.device)
        return torch.div(px, stride, rounding_mode="floor"), (px + 0.5) / stride - 0.5

    (own_y, at_y), (own_x, at_x) = axis(pixels[0], rgb.shape[-2]), axis(pixels[1], rgb.shape[-1])
    y0, x0 = cells
    best = acc = total = None
    for dy in range(-radius, radius + 1):
        qy = (own_y + dy).clamp(y0, y0 + n - 1)
        iy, d2y = qy - y0, (at_y - qy) ** 2
        for dx in range(-radius, radius + 1):
            qx = (own_x + dx).clamp(x0, x0 + m - 1)
            ix, d2x = qx - x0, (at_x - qx) ** 2
            v = var[:, :, iy][..., ix]
            logw = -(d2y[:, None] + d2x[None, :]) / 2 \
                - ((rgb - means[:, :, iy][..., ix]) ** 2).sum(1, keepdim=True) / (2 * v) \
                - log_norm[:, :, iy][..., ix]
            s = scores[:, :, iy][..., ix]
            if best is None:
                best, acc, total = logw, s.clone(), torch.ones_like(logw)
                continue
            top = torch.maximum(best, logw)  # running log-sum-exp: no underflow
            a, b = torch.exp(best - top), torch.exp(logw - top)
            acc = acc * a + s * b
            total = total * a + b
            best = top
    return acc / total


def guided_scores(scores: torch.Tensor, rgb: torch.Tensor, size: tuple[int, int], stride: int,
                  sigma: float, moments: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """Scores ``(1, K, h, w)`` on the cells of a whole image -> ``(1, K, H, W)`` at its
    ``size``: :func:`guided_upsample` to the pixels of the work image the backbone saw,
    ``rgb (3, H', W')`` in [0, 1], then bilinear to ``size`` where the work image was resized.
    ``moments``: the cells' ``(means, spread)`` when the caller has them
    (:func:`~napari_stego.appearance.cell_moments`, batched, on the scores' device)."""
    if moments is None:
        means, spread = cell_moments(rgb, tuple(scores.shape[-2:]), stride)
        moments = means[None].to(scores.device), spread[None].to(scores.device)
    up = guided_upsample(scores, *moments, rgb[None].to(scores.device), stride, sigma)
    if tuple(up.shape[-2:]) != tuple(size):
        up = F.interpolate(up, size=tuple(size), mode="bilinear", align_corners=False)
    return up


@torch.inference_mode()
def guided_probabilities(code: torch.Tensor, rgb: torch.Tensor, size: tuple[int, int],
                         stride: int, config: PredictConfig, score_parts) -> torch.Tensor:
    """Probabilities ``(1, K, H, W)`` of a whole image of ``size`` from its codes
    ``(1, C, h, w)`` and the work image the backbone saw, ``(3, H', W')`` in [0, 1]: scores
    per cell, brought to the pixels by :func:`guided_scores`. ``score_parts(colours)`` gives
    the centroids and the colour part :func:`cluster_scores` takes for cells of mean
    ``colours (1, 3, h, w)`` (:meth:`napari_stego.StegoModel.score_parts`). ``config.guide``
    must be set."""
    means, spread = cell_moments(rgb, tuple(code.shape[-2:]), stride)
    means, spread = means[None].to(code.device), spread[None].to(code.device)
    centroids, colour = score_parts(means)
    up = guided_scores(cluster_scores(code.float(), centroids, colour), rgb, size, stride,
                       config.guide, (means, spread))
    return torch.softmax(config.alpha * up, dim=1)
