"""Principal-mask refinement of the cluster centroids, after PriMaPs-EM (Hahn et al., TMLR 2024).

k-means places each code on its own. Within one image, the cells that a dominant direction of
its codes groups together (a *principal mask*) usually belong to one class. This step moves
the centroids so that every mask is assigned as a unit:

1. **Masks, per image** (:func:`principal_masks`): the first principal direction of the
   image's unit codes (the top eigenvector of their ``(C, C)`` second-moment matrix); the code
   most aligned with it is the mask's anchor; the mask is the cells whose cosine to the anchor
   exceeds Otsu's threshold of those cosines (no set constant: the threshold splits the
   image's own cosines in two). The mask's cells are removed and the next mask is taken from
   the rest, until fewer than ``min_left`` of the cells are left or ``max_masks`` are found.
2. **Segment-constrained updates** (:func:`refine_centroids`): each mask takes the cluster
   with the largest summed probability ``softmax(alpha * cos)`` over its cells; each centroid
   becomes the normalised mean of the codes of the masks it took (a centroid that took none
   stays); repeated until no centroid moves.

Differences from the paper: the masks are not refined by a CRF, and the prototypes are updated
in closed form over all masks (a k-means step) instead of by stochastic gradient steps with a
focal loss and a momentum copy. Predictions are made pixel by pixel from the refined centroids,
as before: the masks are only used while fitting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled
from .head import map_codes

MAX_MASKS = 8
MIN_LEFT = 0.05


def _otsu(values: torch.Tensor) -> float:
    from skimage.filters import threshold_otsu

    v = values.double().cpu().numpy()
    if v.size == 0 or float(v.max()) <= float(v.min()):
        return float(v.min()) - 1.0 if v.size else 0.0
    return float(threshold_otsu(v))


@torch.inference_mode()
def principal_masks(x: torch.Tensor, *, max_masks: int = MAX_MASKS,
                    min_left: float = MIN_LEFT) -> list[torch.Tensor]:
    """Principal masks of one image's codes.

    Args:
        x: ``(N, C)`` unit-norm codes of the image's cells.
        max_masks: at most this many masks.
        min_left: stop when fewer than this fraction of the cells is not in a mask.

    Returns:
        Disjoint ``(N,)`` bool masks, largest-direction first; cells left over are in none.
    """
    n = x.shape[0]
    x = x.double()
    left = torch.ones(n, dtype=torch.bool, device=x.device)
    masks: list[torch.Tensor] = []
    while int(left.sum()) > min_left * n and len(masks) < max_masks:
        rest = x[left]
        _, vecs = torch.linalg.eigh(rest.T @ rest)
        proj = rest @ vecs[:, -1]
        if float(proj.sum()) < 0:  # an eigenvector's sign is arbitrary
            proj = -proj
        sim = x @ rest[proj.argmax()]
        mask = left & (sim > _otsu(sim[left]))
        if not bool(mask.any()):
            break
        masks.append(mask)
        left &= ~mask
    return masks


@torch.inference_mode()
def refine_centroids(codes: Sequence[torch.Tensor], centroids: torch.Tensor, *,
                     alpha: float = 2.0, n_iter: int = 20, tol: float = 1e-5, cancel=None
                     ) -> tuple[torch.Tensor, dict]:
    """Centroids refined so that each image's principal masks are assigned as units.

    Args:
        codes: per image, codes ``(C, h, w)`` or ``(N, C)`` cells (any norm).
        centroids: ``(K, C)`` from k-means on the same codes.
        alpha: the softmax temperature of the predictions (``PredictConfig.alpha``).
        n_iter: at most this many updates.
        cancel: anything with ``is_set()``; checked per image's masks and per update
            (raises :class:`~napari_stego.errors.Cancelled`).

    Returns:
        ``(K, C)`` unit centroids on ``centroids``' device and dtype, and a report
        (``iterations``, ``masks_per_image``, ``moved``: the largest change of a centroid
        from k-means', ``1 - cos``).
    """
    cells = [F.normalize((c.flatten(1).T if c.ndim == 3 else c).float(), dim=1) for c in codes]
    start = F.normalize(centroids.float(), dim=1).to(cells[0].device if cells else "cpu")
    masks = []
    for x in cells:
        _check(cancel)
        masks.append(principal_masks(x))
    # per image with masks: its cells, its masks and each mask's sum of codes (computed once)
    units = [(x, ms, torch.stack([x[m].sum(0) for m in ms])) for x, ms in zip(cells, masks) if ms]
    theta = start
    it = 0
    for it in range(1, n_iter + 1):
        _check(cancel)
        new = torch.zeros_like(theta)
        for x, ms, sums in units:
            p = torch.softmax(alpha * x @ theta.T, dim=1)
            votes = torch.stack([p[m].sum(0) for m in ms]).argmax(1)  # (n_masks,)
            new.index_add_(0, votes, sums)
        new = torch.where(new.norm(dim=1, keepdim=True) > 0, F.normalize(new, dim=1), theta)
        moved = float((new - theta).norm(dim=1).max())
        theta = new
        if moved < tol:
            break
    report = dict(iterations=it,
                  masks_per_image=round(float(np.mean([len(m) for m in masks])) if masks else 0.0, 2),
                  moved=round(float((1 - (theta * start).sum(1)).max()), 4))
    return theta.to(centroids.device, centroids.dtype), report


def refine_for_head(head, maps: Sequence, centroids: torch.Tensor, *,
                    device: torch.device | str = "cpu", seed: int = 0, max_maps: int = 256,
                    alpha: float = 2.0, cancel=None, colours: Sequence | None = None,
                    space=None) -> tuple[torch.Tensor, dict]:
    """:func:`refine_centroids` on ``head``'s codes of at most ``max_maps`` of ``maps``
    (``(D, h, w)`` tensors or lazy maps with ``load()``; a seeded subset when there are more).
    With a :class:`~napari_stego.appearance.ColourSpace` ``space`` and the maps' cell
    ``colours`` ``(3, h, w)``, on the codes with colours (``space.vectors``).
    """
    pick = list(range(len(maps)))
    if len(pick) > max_maps:
        gen = torch.Generator().manual_seed(seed)
        pick = sorted(torch.randperm(len(pick), generator=gen)[:max_maps].tolist())
    codes = []
    for i in pick:
        _check(cancel)
        code = map_codes(head, maps[i], device)
        if space is not None:
            code = space.vectors(code.flatten(1).T, colours[i].flatten(1).T)
        codes.append(code)
    return refine_centroids(codes, centroids, alpha=alpha, cancel=cancel)


def _check(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the refinement of the clusters was cancelled")
