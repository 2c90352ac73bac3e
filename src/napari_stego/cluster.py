"""Spherical (cosine) k-means with k-means++ seeding and mini-batch updates.

Points and centroids live on the unit sphere; similarity is the dot product. Deterministic
for a given ``seed`` (all randomness comes from one CPU ``torch.Generator``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of :func:`spherical_kmeans`.

    ``batch_size`` points per mini-batch update (all points when there are fewer);
    ``n_iter`` mini-batch steps (full Lloyd passes when the data fit one batch);
    ``n_init`` restarts, the one with the highest mean cosine is kept (10, as scikit-learn's
    k-means: with 3, codes of EM images landed in a worse optimum for 2 of 5 seeds, 40 mIoU
    instead of 51; with 10 all 5 seeds found the best one);
    ``tol``: stop a restart once no centroid moves more than this in one update.
    ``lloyd_iter``: when the points were more than one mini-batch, at most this many full
    passes over all of them (Lloyd's algorithm) after the mini-batch updates, until no
    centroid moves more than ``tol``. Mini-batch updates, whose per-centroid step shrinks as
    ``1 / count``, stop short of a fixed point: on ISBI's codes the best of 10 restarts
    ended at a mean cosine of 0.256 where the passes reach 0.262, and the raw features of the
    Outex mosaics scored 41-49 mIoU from seed to seed where the passes give 50.7 on every
    seed (docs/benchmarks.md). 0: the mini-batch result as it is (before 0.2).
    ``guard``: after a fit, check that the codes cluster, and better than the raw features,
    else warn and fall back to the untrained head (:mod:`napari_stego.guard`).
    ``refine``: after k-means, move the centroids so that each training image's principal
    masks are assigned as units (:mod:`napari_stego.refine`, after PriMaPs-EM); at most
    ``refine_maps`` training maps (a seeded subset) are used. On by default: on the six
    benchmark datasets it raised STEGO + CRF by 3.2 mIoU on average over three seeds
    (Jiangxi's blood cells +18.3, the Outex mosaics -1.0; docs/benchmarks.md,
    ``benchmarks/refine.py``). Since the Lloyd passes and the merge its effect is a wash:
    -0.5 on average over the six sets (CamVid +2.6, Jiangxi -2.4, Outex -2.3), -0.1 to +5.7
    on the stand-ins for unseen kinds.
    ``colour``: when the head was trained with appearance in its target, cluster (and refine)
    the codes together with the cells' colours, weighted as in the target
    (:class:`~napari_stego.appearance.ColourSpace`); off: the codes alone, as before.
    ``merge``: with colours, find ``K + 1`` clusters and merge the two whose cells have the
    closest mean colour (clusters that differ by the codes' context but not by colour, such
    as background near objects and far from them, are one class): STEGO + CRF over three
    seeds on the same heads, Jiangxi's blood cells 67.7 -> 80.9, CellaVision 55.4 -> 55.9,
    the fluorescence nuclei 94.9 -> 94.3, drawn two-channel cells 55.7 -> 87.8
    (docs/benchmarks.md).
    """

    n_iter: int = 200
    batch_size: int = 16384
    n_init: int = 10
    max_points: int = 500_000
    tol: float = 1e-5
    guard: bool = True
    refine: bool = True
    refine_maps: int = 256
    colour: bool = True
    merge: bool = True
    lloyd_iter: int = 100


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with cosine distance ``1 - x.c``; ``x (N, C)`` unit rows -> ``(k, C)``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        weights = dist**2
        if float(weights.sum()) <= 0:  # fewer distinct points than clusters
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(weights.cpu(), 1, generator=gen))
        centroids.append(x[idx])
        dist = torch.minimum(dist, (1 - x @ x[idx]).clamp_min(0))
    return torch.stack(centroids)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the most cosine-similar centroid for each row of ``x (N, C)`` -> ``(N,)`` int64."""
    c = F.normalize(centroids, dim=1)
    out = [F.normalize(part, dim=1).matmul(c.T).argmax(1) for part in x.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def _mean_cosine(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> float:
    total = sum(float(part.matmul(centroids.T).max(1).values.sum()) for part in x.split(chunk))
    return total / max(x.shape[0], 1)


def _fit_once(x: torch.Tensor, k: int, config: ClusterConfig, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    centroids = _kmeans_plus_plus(x, k, gen)
    if n <= config.batch_size:  # one batch holds every point: Lloyd's algorithm throughout
        return _lloyd(x, centroids, config.n_iter, config.tol)
    counts = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(config.n_iter):
        # Sculley's mini-batch update with per-centroid learning rate 1 / count
        batch = x[torch.randint(n, (config.batch_size,), generator=gen).to(x.device)]
        onehot = F.one_hot(batch.matmul(centroids.T).argmax(1), k).to(x.dtype)  # (b, k)
        sums = onehot.T @ batch  # (k, C); a matmul is far faster than index_add_ on CPU
        hits = onehot.sum(0)
        counts += hits
        rate = torch.where(counts > 0, hits / counts.clamp_min(1), torch.zeros_like(hits))
        means = sums / hits.clamp_min(1)[:, None]
        new = F.normalize(centroids + rate[:, None] * (means - centroids), dim=1)
        moved = float((new - centroids).norm(dim=1).max())
        centroids = new
        if moved < config.tol:
            break
    return _lloyd(x, centroids, config.lloyd_iter, config.tol)


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, n_iter: int, tol: float,
           chunk: int = 65536) -> torch.Tensor:
    """Full Lloyd passes over ``x (N, C)`` unit rows from ``centroids (K, C)``, at most
    ``n_iter``, until no centroid moves more than ``tol``; a centroid left without points
    stays where it is."""
    k = centroids.shape[0]
    for _ in range(n_iter):
        sums = torch.zeros_like(centroids)
        hits = torch.zeros(k, dtype=x.dtype, device=x.device)
        for part in x.split(chunk):
            onehot = F.one_hot(part.matmul(centroids.T).argmax(1), k).to(x.dtype)
            sums += onehot.T @ part
            hits += onehot.sum(0)
        new = F.normalize(torch.where(hits[:, None] > 0, sums, centroids), dim=1)
        moved = float((new - centroids).norm(dim=1).max())
        centroids = new
        if moved < tol:
            break
    return centroids


def spherical_kmeans(x: torch.Tensor, n_clusters: int, *, seed: int = 0,
                     config: ClusterConfig = ClusterConfig(),
                     on_restart: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Cluster vectors by cosine similarity.

    Args:
        x: ``(N, C)`` points (any norm; they are L2-normalised first).
        n_clusters: ``K``.
        seed: seeds the k-means++ draws and the mini-batches.
        config: iteration counts and sizes.
        on_restart: called as ``on_restart(done, n_init)`` after each restart (progress).

    Returns:
        ``(K, C)`` unit-norm centroids, on ``x``'s device.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (N, C) tensor, got shape {tuple(x.shape)}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(x.float(), dim=1)
    if x.shape[0] > config.max_points:
        x = x[torch.randperm(x.shape[0], generator=gen)[: config.max_points].to(x.device)]
    best, best_score = None, -float("inf")
    n_init = max(config.n_init, 1)
    for i in range(n_init):
        centroids = _fit_once(x, n_clusters, config, gen)
        score = _mean_cosine(x, centroids)
        if score > best_score:
            best, best_score = centroids, score
        if on_restart is not None:
            on_restart(i + 1, n_init)
    return best
