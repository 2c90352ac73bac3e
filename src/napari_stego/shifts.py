"""Choosing the loss shifts from the data's own feature correlations (``shifts="auto"``).

The reference's shifts (0.18 / 0.12 / 0.46) were tuned by hand for DINO ViT-S/8 on natural
photos with many classes; other backbones and domains differ. With EfficientNet-Lite0 features
on EM or blood-smear images, for instance, the spatially centred self and KNN correlations
average about 0.5, so the reference shifts make 94-100 % of the self / KNN pairs attract and
the codes collapse.

The rule (no labels read): sample feature correlations exactly as training will (same windows,
partners, point sampling and centring) and set each term's shift to the quantile of its own
correlations that leaves a fixed fraction of its pairs attracted (``F_sc > b``): 30 % for each
term by default, a balance that does not depend on the backbone's correlation scale. Measured
(docs/benchmarks.md): with more than half of the pairs attracted the codes collapse to one
direction (texture mosaics: 97 % accuracy at step 0, 52 % after 30 steps); at 30 % the blood-
cell set goes from 33.0 (k-means on the features) to 44.2 mIoU.

Where the classes are textured regions, more attracted self pairs serve better
(``region_self_attract``, 0.5); where the classes are thin structures that the features'
groups only speckle, fewer (``speckle_self_attract``, 0.05). Two conditions, both measured
without labels: colour does not define the classes (the appearance rule left colour out of
the target: weight 0), and whether the raw features' own K-means groups (the fit's number of
clusters) make regions, by the appearance rule's statistic (Cohen's kappa of the groups of
neighbouring cells, :func:`~napari_stego.appearance.coherence`) and its gate
``clip((kappa - 0.45) / 0.1, 0, 1)``: the self fraction moves from ``speckle_self_attract``
(gate 0) to ``region_self_attract`` (gate 1) by that gate (:func:`feature_regions`; the
gate's middle gives 0.275, near the 0.3 of the other terms). Measured (docs/benchmarks.md,
runs 16-18; seeds 0-2): at 0.5 instead of 0.3 the texture mosaics gain 8-10 mIoU with or
without the CRF, CamVid 3-4 without it and 0.4-1.9 with it (both without colour in the
target, kappa 0.87 and 0.75); the EM membranes, one feature cell wide (kappa 0.41: their
groups speckle), lose 5-7 at 0.5 and gain 5 without the CRF at 0.05 (55.8 -> 60.9-61.1
over three seeds, past the raw features' 60.5; with the CRF 62.9 -> 60.9-61.3: the CRF has
less to mend). Where stains define the classes small stained structures are merged away at
0.5 (the IHC sample's nuclei at up-sample 2, three seeds of three; the blood cells lose
0.4-3), so with colour in the target the fraction stays ``self_attract``.

Alternatively (``*_attract=None``) each fraction is estimated with a label-free proxy:
spherical k-means on the raw features with the requested number of clusters, a pair "belongs
together" when both points fall in the same proxy cluster. On the stacks measured this gives
0.45-0.67, in the collapsing range, so it is not the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .appearance import coherence, coherence_gate
from .cluster import ClusterConfig, spherical_kmeans
from .knn import Unit, draw_pair_points, pack_maps, sample_vectors
from .loss import centre_correlation, correlation, negative_permutation

TERMS = ("self", "knn", "rand")


@dataclass(frozen=True)
class AutoShiftConfig:
    """How shifts are chosen.

    ``*_attract``: fraction of each term's pairs that should attract; ``None`` estimates it
    from a k-means proxy of the raw features. ``region_self_attract``: the self fraction where
    colour is not in the target and the raw features' groups make regions
    (:func:`feature_regions`); ``speckle_self_attract``: the self fraction there when the
    groups speckle instead (between the two where they partly do; ``None``: ``self_attract``,
    as model files from before it). ``region_self_attract=None`` keeps ``self_attract`` for
    all data. ``n_batches``: training-like batches to measure on.
    ``min_attract``/``max_attract`` keep every term in a sane range.
    """

    self_attract: float | None = 0.3
    knn_attract: float | None = 0.3
    rand_attract: float | None = 0.3
    region_self_attract: float | None = 0.5
    speckle_self_attract: float | None = 0.05
    n_batches: int = 8
    min_attract: float = 0.05
    max_attract: float = 0.95


@dataclass
class PairSamples:
    """Sampled features of one measurement: ``(B, D, S, S)`` for the batch, partners, negatives."""

    anchor: torch.Tensor
    knn: torch.Tensor
    rand: torch.Tensor

    def partner(self, term: str) -> torch.Tensor:
        return {"self": self.anchor, "knn": self.knn, "rand": self.rand}[term]


@torch.no_grad()
def sample_pair_points(maps: Sequence[torch.Tensor], units: Sequence[Unit], table: torch.Tensor, *,
                       window: int, batch_size: int, feature_samples: int, n_batches: int,
                       gen: torch.Generator, transform=None,
                       on_batch: Callable[[], None] | None = None) -> list[PairSamples]:
    """Point features of the self, KNN and random pairs, drawn as training draws them
    (``transform``: applied to each sampled tensor, e.g. the appearance teacher;
    ``on_batch()``: called after each batch, for progress)."""
    out = []
    t = transform or (lambda x: x)
    packed = pack_maps(maps, units, table)  # once, not once per batch
    for _ in range(n_batches):
        pts = draw_pair_points(packed, None, None, batch_size, window, feature_samples, gen)
        neg = pts.anchor2[negative_permutation(batch_size, gen)]  # another window at these points
        out.append(PairSamples(t(pts.anchor1), t(pts.partner), t(neg)))
        if on_batch is not None:
            on_batch()
    return out


def pair_correlations(samples: Sequence[PairSamples], pointwise: bool = True) -> dict[str, torch.Tensor]:
    """Flattened (centred) feature correlations per term: ``{"self": (N,), "knn": ..., "rand": ...}``."""
    post = centre_correlation if pointwise else (lambda t: t)
    return {term: torch.cat([post(correlation(p.anchor, p.partner(term))).flatten() for p in samples])
            for term in TERMS}


def same_cluster_rates(samples: Sequence[PairSamples], centroids: torch.Tensor) -> dict[str, float]:
    """Fraction of each term's point pairs whose two points share a proxy cluster.

    ``centroids (K, D)``: cluster centres of the raw features.
    """
    def labels(x: torch.Tensor) -> torch.Tensor:  # (B, D, S, S) -> (B, S*S)
        return torch.einsum("bdn,kd->bkn", F.normalize(x.flatten(2), dim=1), centroids).argmax(1)

    rates = {}
    for term in TERMS:
        same = total = 0
        for p in samples:
            a, b = labels(p.anchor), labels(p.partner(term))
            same += int((a[:, :, None] == b[:, None, :]).sum())
            total += a.shape[0] * a.shape[1] * b.shape[1]
        rates[term] = same / total
    return rates


def feature_centroids(maps: Sequence[torch.Tensor], n_clusters: int, seed: int = 0,
                      max_points: int = 50_000) -> torch.Tensor:
    """Spherical k-means centres ``(K, D)`` of the raw feature vectors of ``maps``: one
    mini-batch restart, without Lloyd passes (a rough partition for the pair rates; the
    attracted fractions were measured with it)."""
    vectors = sample_vectors(maps, max_points, torch.Generator().manual_seed(seed))
    return spherical_kmeans(vectors, n_clusters, seed=seed,
                            config=ClusterConfig(n_init=1, lloyd_iter=0))


def feature_regions(maps: Sequence[torch.Tensor], n_clusters: int, seed: int = 0,
                    n_points: int = 10_000) -> dict:
    """Whether the raw features' own K-means groups make regions.

    Args:
        maps: feature maps ``(D, h, w)`` (the backbone's, not the appearance target's).
        n_clusters: ``K`` of the fit (at least 2 groups are formed).
        n_points: cells sampled for the spherical k-means (3 restarts, Lloyd passes; with one
            mini-batch restart the EM membranes' two-way split landed in either of two optima,
            kappa 0.41 or 0.79).

    Returns:
        dict with ``coherence`` (Cohen's kappa of the groups of 4-neighbour cells over all
        maps, :func:`~napari_stego.appearance.coherence`) and ``gate``
        (``clip((coherence - 0.45) / 0.1, 0, 1)``, the appearance rule's gate).
    """
    gen = torch.Generator().manual_seed(seed + 2003)  # apart from the other samples' draws
    vectors = sample_vectors(maps, n_points, gen)
    centres = spherical_kmeans(vectors, max(int(n_clusters), 2), seed=seed,
                               config=ClusterConfig(n_init=3)).cpu()
    # the nearest unit centre is the most similar one by cosine: each map is labelled as it
    # is, one at a time (no float32 copy of all maps)
    kappa = coherence(maps, centres.numpy())
    gate = coherence_gate(kappa)
    return dict(coherence=round(kappa, 4), gate=round(gate, 4))


def choose_shifts(corrs: dict[str, torch.Tensor], attract: dict[str, float],
                  config: AutoShiftConfig = AutoShiftConfig()) -> tuple[float, float, float]:
    """``(self, knn, rand)`` shifts: the ``1 - attract`` quantile of each term's correlations."""
    def q(values: torch.Tensor, fraction: float) -> float:
        fraction = min(max(fraction, config.min_attract), config.max_attract)
        if values.numel() > 1_000_000:  # torch.quantile's size limit; a strided subset is plenty
            values = values[:: values.numel() // 1_000_000 + 1]
        return round(float(torch.quantile(values, 1.0 - fraction)), 4)

    return tuple(q(corrs[t], attract[t]) for t in TERMS)


def auto_shifts(maps: Sequence[torch.Tensor], units: Sequence[Unit], table: torch.Tensor, *,
                n_clusters: int | None, window: int, batch_size: int, feature_samples: int,
                pointwise: bool, config: AutoShiftConfig, seed: int = 0,
                transform=None, on_batch: Callable[[], None] | None = None,
                ) -> tuple[tuple[float, float, float], dict]:
    """Shifts for training on ``maps``, and a report of what they were derived from
    (``on_batch()`` after each of the ``config.n_batches`` measured batches).

    ``transform``: the appearance teacher when colour is in the training target; then
    ``region_self_attract`` and ``speckle_self_attract`` do not apply. Else
    :func:`feature_regions` measures ``maps``, the backbone's features.

    Returns:
        ``((self, knn, rand), report)``; the report holds the attracted fractions used and
        ``regions``: :func:`feature_regions`'s measure, or why it was not taken.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    samples = sample_pair_points(maps, units, table, window=window, batch_size=batch_size,
                                 feature_samples=feature_samples, n_batches=config.n_batches, gen=gen,
                                 transform=transform, on_batch=on_batch)
    fixed = {"self": config.self_attract, "knn": config.knn_attract, "rand": config.rand_attract}
    report: dict = {}
    if config.region_self_attract is not None and config.self_attract is not None:
        if transform is not None:
            report["regions"] = "not measured: colour is in the target"
        elif n_clusters is None:
            report["regions"] = "not measured: no number of clusters"
        else:
            regions = feature_regions(maps, n_clusters, seed)
            low = (config.self_attract if config.speckle_self_attract is None
                   else config.speckle_self_attract)
            fixed["self"] = low + regions["gate"] * (config.region_self_attract - low)
            report["regions"] = regions
    if any(v is None for v in fixed.values()):
        if n_clusters is None:
            raise ValueError("automatic attraction fractions need n_clusters")
        proxy = maps if transform is None else [transform(m[None].float())[0] for m in maps]
        rates = same_cluster_rates(samples, feature_centroids(proxy, n_clusters, seed))
        fixed = {t: rates[t] if fixed[t] is None else fixed[t] for t in TERMS}
    shifts = choose_shifts(pair_correlations(samples, pointwise), fixed, config)
    return shifts, {"attract": {t: round(v, 4) for t, v in fixed.items()}, **report}
