"""A usefulness guard after a fit: do the codes cluster at all, and better than the features?

Measured without labels on held-back cells (a seeded sample drawn apart from the k-means
sample) of the training maps:

* ``largest_share``: the share of the cells that the biggest cluster of the codes takes;
  ``spread``: ``1 - |mean of the unit codes|``, 0 when every code points the same way.
  A head whose codes all point one way (``spread < MIN_SPREAD``) or put nearly every cell in
  one cluster (``largest_share > MAX_SHARE``) has **collapsed**.
* ``silhouette_codes`` / ``silhouette_features``: the simplified silhouette (cosine distance
  to the own centroid against the nearest other one, ``(b - a) / max(a, b)``, averaged) of
  the codes with the model's centroids and of the raw features with a spherical k-means of
  their own (fitted on another sample). Codes that score less than ``MIN_RATIO`` times the
  features are **worse** than the features.

When either holds, :meth:`napari_stego.StegoModel.fit` warns (``model.info["warnings"]``,
which the CLI and the widget show) and falls back to the untrained head started from the
features' principal directions (:func:`~napari_stego.head.init_from_features`), whose codes
keep the raw features' cosine geometry, with centroids clustered on its codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .cluster import ClusterConfig, spherical_kmeans
from .knn import sample_vectors

MAX_SHARE = 0.98
MIN_SPREAD = 1e-3
MIN_RATIO = 0.5


def simplified_silhouette(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean simplified silhouette of ``x (N, C)`` under cosine distance to ``centroids``."""
    if centroids.shape[0] < 2:
        return 0.0
    d = 1 - F.normalize(x.float(), dim=1) @ F.normalize(centroids.float(), dim=1).T
    two = d.topk(2, dim=1, largest=False).values
    a, b = two[:, 0], two[:, 1]
    return float(((b - a) / torch.maximum(a, b).clamp_min(1e-8)).mean())


@torch.inference_mode()
def check_codes(head, maps: Sequence[torch.Tensor], centroids: torch.Tensor, *, seed: int = 0,
                device: torch.device | str = "cpu", n_points: int = 10_000) -> dict:
    """The guard's measurements and verdict (see the module doc).

    Returns:
        dict with ``largest_share``, ``spread``, ``silhouette_codes``,
        ``silhouette_features``, ``collapsed``, ``worse`` and ``fallback`` (either).
    """
    gen = torch.Generator().manual_seed(seed + 1009)  # apart from k-means' own draws
    held = sample_vectors(maps, n_points, gen)
    fit_sample = sample_vectors(maps, n_points, gen)
    k = int(centroids.shape[0])
    codes = head(held.to(device, torch.float32).T[None, :, :, None])[0, :, :, 0].T.float().cpu()
    units = F.normalize(codes, dim=1)
    spread = float(1 - units.mean(0).norm())
    cents = centroids.float().cpu()
    shares = torch.bincount((units @ F.normalize(cents, dim=1).T).argmax(1), minlength=k)
    largest = float(shares.max()) / max(len(codes), 1)
    feat_cents = spherical_kmeans(fit_sample, k, seed=seed, config=ClusterConfig(n_init=3))
    s_codes = simplified_silhouette(codes, cents)
    s_feats = simplified_silhouette(held, feat_cents.cpu())
    collapsed = k > 1 and (spread < MIN_SPREAD or largest > MAX_SHARE)
    worse = k > 1 and s_codes < MIN_RATIO * s_feats
    return dict(largest_share=round(largest, 4), spread=round(spread, 5),
                silhouette_codes=round(s_codes, 4), silhouette_features=round(s_feats, 4),
                collapsed=bool(collapsed), worse=bool(worse), fallback=bool(collapsed or worse))


def warning_text(report: dict) -> str:
    why = ("the head collapsed (one cluster takes "
           f"{100 * report['largest_share']:.0f} % of the cells)" if report["collapsed"] else
           f"the codes cluster worse than the raw features (silhouette "
           f"{report['silhouette_codes']:.2f} against {report['silhouette_features']:.2f})")
    return (f"{why}: fell back to the untrained head (the features' principal directions); "
            "try other settings (steps, n_clusters) or more images")
