"""STEGO's contrastive correlation loss (Hamilton et al., ICLR 2022, Eqs. 1-5).

Pure functions over tensors; the numbers follow the reference implementation
(``../shared/docs/stego-reference.md`` section 4), including its spatial centring, its means
instead of sums and its point sampling with ``grid_sample``.

Shapes: features ``(B, D, h, w)``, codes ``(B, K, h, w)``, sampled maps ``(B, C, S, S)``,
correlation tensors ``(B, H, W, I, J)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_EPS = 1e-10


@dataclass(frozen=True)
class LossConfig:
    """Weights (lambda) and shifts (b) of the three pair terms, and the sampling sizes.

    Defaults are the reference trainer's active configuration (ViT-S/8).
    """

    self_weight: float = 0.67
    knn_weight: float = 0.25
    rand_weight: float = 0.63
    self_shift: float = 0.18
    knn_shift: float = 0.12
    rand_shift: float = 0.46
    feature_samples: int = 11
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False


@dataclass
class StegoLoss:
    """Result of :func:`stego_loss`: the weighted total and the three (unweighted) means."""

    total: torch.Tensor
    self: torch.Tensor
    knn: torch.Tensor
    rand: torch.Tensor


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correlation of every location of ``a`` with every location of ``b`` (Eq. 1).

    Args:
        a: ``(B, C, H, W)``.
        b: ``(B, C, I, J)``, same ``B`` and ``C``.

    Returns:
        ``(B, H, W, I, J)``: ``sum_c a'[n,c,h,w] * b'[n,c,i,j]`` with ``a'``, ``b'`` L2-normalised
        over ``C`` (eps 1e-10).
    """
    return _dot(unit_norm(a), unit_norm(b))


def unit_norm(t: torch.Tensor) -> torch.Tensor:
    """``t (B, C, ...)`` L2-normalised over ``C`` with the loss's eps (1e-10)."""
    return F.normalize(t, dim=1, eps=_EPS)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`correlation` of inputs that are already normalised."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def centre_correlation(fd: torch.Tensor) -> torch.Tensor:
    """Spatial centring ``F - mean_ij(F) + mean_all(F)`` of a ``(B, H, W, I, J)`` correlation.

    Operations in the reference's order, so values match it to the last bit.
    """
    global_mean = fd.mean()
    fd = fd - fd.mean(dim=(3, 4), keepdim=True)
    return fd - fd.mean() + global_mean


def pair_loss(
    f1: torch.Tensor,
    f2: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    shift: float,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
    normalized: bool = False,
) -> torch.Tensor:
    """Element-wise correlation loss ``-clamp(S) * (F_sc - shift)`` for one image pair (Eqs. 2-4).

    Args:
        f1, f2: features ``(B, D, H, W)`` and ``(B, D, I, J)``; no gradient flows into them.
        c1, c2: codes ``(B, K, H, W)`` and ``(B, K, I, J)``.
        shift: the shift ``b``.
        pointwise: spatially centre the feature correlation,
            ``F - mean_ij(F) + mean_all(F)``.
        zero_clamp: clamp the code correlation below at 0.
        stabilize: also clamp it above at 0.8.
        normalized: the inputs are already L2-normalised over channels (skips that step).

    Returns:
        ``(B, H, W, I, J)`` loss; callers reduce it with a mean.
    """
    with torch.no_grad():
        fd = _dot(f1, f2) if normalized else correlation(f1, f2)
        if pointwise:
            fd = centre_correlation(fd)
    cd = _dot(c1, c2) if normalized else correlation(c1, c2)
    low = 0.0 if zero_clamp else -9999.0
    cd = cd.clamp(low, 0.8) if stabilize else cd.clamp(low)
    return -cd * (fd - shift)


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``t (B, C, h, w)`` at ``coords (B, S, S, 2)`` in [-1, 1] (x, y).

    ``align_corners=True`` and border padding, as the reference; output ``[n, :, p, q]`` is the
    sample at ``coords[n, q, p]`` (the reference swaps the two grid axes).

    Returns:
        ``(B, C, S, S)``.
    """
    return F.grid_sample(
        t, coords.permute(0, 2, 1, 3), mode="bilinear", padding_mode="border", align_corners=True
    )


def negative_permutation(batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """A random partner index for every batch item, never the item itself when ``batch > 1``.

    A random permutation whose fixed points ``i`` are replaced by ``(i + 1) % batch`` (the
    result may repeat indices, as in the reference).

    Drawn on the generator's device (no host reads), then moved to ``device`` if given.

    Returns:
        ``(batch,)`` int64.
    """
    where = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(batch, generator=generator, device=where)
    if batch > 1:
        idx = torch.arange(batch, device=where)
        perm = torch.where(perm == idx, (idx + 1) % batch, perm)
    return perm.to(device) if device is not None else perm


def stego_loss(
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    config: LossConfig = LossConfig(),
    *,
    coords1: torch.Tensor | None = None,
    coords2: torch.Tensor | None = None,
    neg_perms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StegoLoss:
    """The full STEGO correlation loss for a batch and its KNN partners (Eq. 5).

    Args:
        feats, feats_pos: backbone features ``(B, D, h, w)`` of the batch and of its partners.
        code, code_pos: head outputs ``(B, K, h, w)`` for the same images.
        config: weights, shifts and sampling sizes.
        coords1, coords2: ``(B, S, S, 2)`` sample points in [-1, 1] (x, y) for the batch and for
            the partners/negatives; drawn uniformly from ``generator`` (coords1 first) if absent.
        neg_perms: ``(neg_samples, B)`` integer; row ``r`` gives each image's negative partner
            (taken from the batch itself and sampled at ``coords2``). Drawn if absent.
        generator: random source for whatever is not given (CPU generator).

    Returns:
        :class:`StegoLoss` with ``total = w_self*self + w_knn*knn + w_rand*rand`` (means).
    """
    batch = feats.shape[0]
    s = config.feature_samples
    device = feats.device

    def draw_coords() -> torch.Tensor:
        return (torch.rand(batch, s, s, 2, generator=generator) * 2 - 1).to(device)

    if coords1 is None:
        coords1 = draw_coords()
    if coords2 is None:
        coords2 = draw_coords()
    coords1 = coords1.to(device=device, dtype=feats.dtype)
    coords2 = coords2.to(device=device, dtype=feats.dtype)
    if neg_perms is None:
        neg_perms = torch.stack(
            [negative_permutation(batch, generator) for _ in range(config.neg_samples)]
        )
    neg_perms = torch.as_tensor(neg_perms, dtype=torch.long).to(device)

    f1 = sample_points(feats, coords1)
    c1 = sample_points(code, coords1)
    f2 = sample_points(feats_pos, coords2)
    c2 = sample_points(code_pos, coords2)
    negatives = [(sample_points(feats[perm], coords2), sample_points(code[perm], coords2))
                 for perm in neg_perms]
    return points_loss(f1, c1, f2, c2, negatives, config)


def points_loss(f1: torch.Tensor, c1: torch.Tensor, f2: torch.Tensor, c2: torch.Tensor,
                negatives: Sequence[tuple[torch.Tensor, torch.Tensor]],
                config: LossConfig = LossConfig(), *, normalized: bool = False) -> StegoLoss:
    """The STEGO loss (Eq. 5) from features and codes already sampled at the loss's points.

    Args:
        f1, c1: features ``(B, D, S, S)`` and codes ``(B, K, S, S)`` of the batch.
        f2, c2: the same for the KNN partners.
        negatives: one ``(features, codes)`` pair of ``(B, ., S, S)`` tensors per negative
            sample: each batch item's random partner.
        normalized: every tensor is already L2-normalised over channels (callers that
            normalise once and index the negatives out of the same tensors).

    Returns:
        :class:`StegoLoss` with ``total = w_self*self + w_knn*knn + w_rand*rand`` (means).
    """
    def unit(t: torch.Tensor) -> torch.Tensor:
        return t if normalized else unit_norm(t)

    # each tensor is normalised once, not once per term it appears in
    f1, c1, f2, c2 = unit(f1), unit(c1), unit(f2), unit(c2)
    flags = dict(pointwise=config.pointwise, zero_clamp=config.zero_clamp,
                 stabilize=config.stabilize, normalized=True)
    self_loss = pair_loss(f1, f1, c1, c1, config.self_shift, **flags)
    knn_loss = pair_loss(f1, f2, c1, c2, config.knn_shift, **flags)
    rand_loss = torch.cat([pair_loss(f1, unit(fn), c1, unit(cn), config.rand_shift, **flags)
                           for fn, cn in negatives], dim=0)

    self_mean, knn_mean, rand_mean = self_loss.mean(), knn_loss.mean(), rand_loss.mean()
    # summed in the reference trainer's order (knn, self, rand)
    total = (config.knn_weight * knn_mean + config.self_weight * self_mean
             + config.rand_weight * rand_mean)
    return StegoLoss(total=total, self=self_mean, knn=knn_mean, rand=rand_mean)
