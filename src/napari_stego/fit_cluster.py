"""The "cluster" stage of a fit: the trained head's codes -> centroids.

In data-flow order: codes of the training maps (a seeded sample) -> spherical k-means ->
the usefulness guard (:mod:`napari_stego.guard`) -> the principal-mask refinement
(:mod:`napari_stego.refine`). When the head was trained with appearance in its target and
``ClusterConfig.colour`` is on, every step runs on the codes together with the cells'
colours (:class:`~napari_stego.appearance.ColourSpace`), so the clusters are decided by
what the head was trained to reproduce; with ``ClusterConfig.merge`` those steps find
``K + 1`` clusters and the two whose cells have the closest mean colour are merged
(:func:`merge_closest_colours`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .appearance import ColourSpace
from .cluster import ClusterConfig, assign, spherical_kmeans
from .errors import Cancelled
from .head import SegmentationHead, map_codes
from .predict import PredictConfig
from .refine import refine_for_head

Progress = Callable[[str, int, int], None]


@dataclass
class Clusters:
    """What the stage gives a model: the head kept (the trained one, or the guard's
    fallback), the centroids' code part ``(K, C)``, their colour part ``(K, M)`` and the
    colour space (``None`` when the codes are clustered alone), and the reports."""

    head: SegmentationHead
    centroids: torch.Tensor
    colour_centroids: torch.Tensor | None
    space: ColourSpace | None
    shares: list = field(default_factory=list)
    guard: dict = field(default_factory=dict)
    refine: dict | None = None
    merged: dict | None = None


@torch.inference_mode()
def sample_codes(head: SegmentationHead, maps, device, max_points: int, seed: int,
                 colours: Sequence[torch.Tensor] | None = None,
                 space: ColourSpace | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes for k-means: all cells when there are at most ``max_points`` (as in 0.1), else
    a seeded random subset spread over the maps in proportion to their size, and ``None``.
    With ``space`` and the maps' cell ``colours`` ``(3, h, w)``: the
    :meth:`ColourSpace.vectors` of the same cells, and those cells' colours ``(N, 3)``."""
    sizes = [int(m.shape[-2]) * int(m.shape[-1]) for m in maps]
    total = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    out, cells = [], []
    for i, (m, n) in enumerate(zip(maps, sizes)):
        code = map_codes(head, m, device).flatten(1).T
        take = n if total <= max_points else max(1, round(max_points * n / total))
        pick = torch.randperm(n, generator=gen)[:take] if take < n else None
        if pick is not None:
            code = code[pick.to(code.device)]
        if space is not None:
            col = colours[i].flatten(1).T
            col = col if pick is None else col[pick]
            code = space.vectors(code, col)
            cells.append(col.float().cpu())
        out.append(code)
    return torch.cat(out), (torch.cat(cells) if cells else None)


def merge_closest_colours(vectors: torch.Tensor, centroids: torch.Tensor,
                          colours: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Merge the two clusters whose cells have the closest mean colour.

    Args:
        vectors: ``(N, D)`` clustered vectors; ``centroids``: ``(K + 1, D)`` unit centroids;
        colours: ``(N, 3)`` the cells' colours.

    Returns:
        ``(K, D)`` unit centroids (the merged one, the share-weighted mean of the pair, at the
        first one's place) and a report: the pair, their mean colours and shares. An empty
        cluster is the one dropped.
    """
    groups = assign(vectors, centroids).cpu()
    k1 = int(centroids.shape[0])
    counts = torch.bincount(groups, minlength=k1).float()
    if bool((counts == 0).any()):
        drop = int(torch.nonzero(counts == 0)[0])
        keep = [j for j in range(k1) if j != drop]
        return centroids[keep], dict(dropped_empty=drop)
    means = torch.stack([colours[groups == j].mean(0) for j in range(k1)])
    dist = torch.cdist(means, means)
    dist.fill_diagonal_(float("inf"))
    i, j = sorted(divmod(int(dist.argmin()), k1))
    c = centroids.cpu().float()
    merged = F.normalize(counts[i] * c[i] + counts[j] * c[j], dim=0)
    out = torch.cat([c[:i], merged[None], c[i + 1: j], c[j + 1:]]).to(centroids)
    shares = counts / counts.sum()
    return out, dict(pair=[i, j], colours=[[round(float(v), 4) for v in means[t]] for t in (i, j)],
                     shares=[round(float(shares[t]), 4) for t in (i, j)])


def cluster_stage(head: SegmentationHead, maps, n_clusters: int, cluster: ClusterConfig, *,
                  device, seed: int, colours: Sequence[torch.Tensor] | None = None,
                  space: ColourSpace | None = None, progress: Progress | None = None,
                  cancel=None) -> Clusters:
    """Centroids for a trained ``head`` on its training ``maps`` (see the module doc).

    Args:
        maps: the training maps ``(D, h, w)`` (tensors or lazy maps with ``load()``).
        colours: their cells' colours ``(3, h, w)`` when the fit had them; with ``space``
            (and ``cluster.colour``) the clustering uses them.
        progress: ``progress("cluster", done, total)``: the codes, each k-means restart,
            the refinement.
        cancel: checked after each restart and inside the refinement.
    """
    if space is not None and (colours is None or not cluster.colour or not space.active):
        space = None
    merge = space is not None and cluster.merge
    total = 1 + max(cluster.n_init, 1) + int(cluster.refine)
    if progress is not None:
        progress("cluster", 0, total)
    codes, cells = sample_codes(head, maps, device, cluster.max_points, seed, colours, space)
    if progress is not None:
        progress("cluster", 1, total)

    def restart(i: int, n: int) -> None:  # progress, and Cancel between restarts
        if progress is not None:
            progress("cluster", 1 + i, total)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"clustering cancelled after {i} of {n} k-means restarts")

    centroids = spherical_kmeans(codes, int(n_clusters) + int(merge), seed=seed,
                                 config=cluster, on_restart=restart)
    guard = {}
    if cluster.guard:
        code_part = space.split(centroids)[0] if space is not None else centroids
        kept, fb_codes, fb_centroids, guard = _guarded(head, maps, code_part, device,
                                                       cluster, seed, int(n_clusters))
        if guard.get("fallback"):  # the untrained head's codes, clustered alone (K clusters)
            head, codes, centroids, space, merge = kept, fb_codes, fb_centroids, None, False
    refined = None
    if cluster.refine:
        refined = refine_for_head(head, maps, centroids, device=device, seed=seed,
                                  max_maps=cluster.refine_maps, alpha=PredictConfig().alpha,
                                  cancel=cancel, colours=colours if space else None,
                                  space=space)
        centroids = refined[0]
        if progress is not None:
            progress("cluster", total, total)
    merged = None
    if merge:
        centroids, merged = merge_closest_colours(codes, centroids, cells)
    shares = torch.bincount(assign(codes, centroids).cpu(), minlength=int(n_clusters))
    shares = [round(float(v), 4) for v in shares / max(len(codes), 1)]
    code_c, colour_c = space.split(centroids) if space is not None else (centroids, None)
    return Clusters(head, code_c, colour_c, space, shares, guard,
                    refined[1] if refined is not None else None, merged)


def _guarded(head: SegmentationHead, maps, centroids: torch.Tensor, device,
             cluster: ClusterConfig, seed: int, n_clusters: int):
    """The usefulness guard (:mod:`napari_stego.guard`) on the codes and the centroids' code
    part: ``(head, None, None, report)``, or the untrained PCA head with its clustered codes
    and centroids when the trained codes collapsed or are worse."""
    from .guard import check_codes, warning_text
    from .head import init_from_features
    from .knn import sample_vectors

    report = check_codes(head, maps, centroids, seed=seed, device=device)
    if not report["fallback"]:
        return head, None, None, report
    report["warning"] = warning_text(report)
    logging.getLogger("napari_stego").warning("napari-stego fit: %s", report["warning"])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        plain = SegmentationHead(head.in_dim, head.code_dim, float(head.dropout.p))
    plain = init_from_features(plain, sample_vectors(maps, 20_000, gen)).to(device).eval()
    codes = sample_codes(plain, maps, device, cluster.max_points, seed)[0]
    return plain, codes, spherical_kmeans(codes, n_clusters, seed=seed, config=cluster), report
