"""Help choosing the number of clusters ``K``: score a range of ``K`` on a model's codes.

No labels are needed. Each ``K`` gets three scores, all computed on the same random sample of
code vectors (unit-normalised):

* **Calinski-Harabasz** (CH) -- the between-cluster over the within-cluster sum of squares,
  each per degree of freedom: ``(B / (K - 1)) / (W / (N - K))`` (Calinski & Harabasz 1974),
  on the unit vectors (where the squared Euclidean distance is ``2 - 2 cos``) for the k-means
  labelling with the highest mean cosine among the runs. High when splitting into ``K``
  clusters explains much of the spread for the clusters it costs.
* **silhouette** -- the mean cosine silhouette (distance ``1 - cos``) of the same labelling.
  In ``[-1, 1]``; high when clusters are tight and far apart. Computed exactly on every
  sampled vector in ``O(N K D)``: for unit vectors the mean cosine distance to a cluster is
  ``1 - x . sum(members) / n``.
* **stability** -- the mean adjusted Rand index (ARI) between the labellings of ``seeds``
  k-means runs, each fitted on its own random ``fit_fraction`` of the sample (and its own
  k-means++ seed) and then applied to the whole sample. 1 when every run finds the same
  partition; near 0 when the partition is arbitrary.

The suggested ``K`` (:attr:`KScores.best`), the rule in :data:`BEST_RULE`: the highest CH
(ties: the smaller ``K``). It was chosen among the candidate rules of
``benchmarks/suggest_k_rules.py`` (the silhouette's maximum, the previous rule, knees of the
distortion curve, the gap statistic, Davies-Bouldin, ...) on the six labelled datasets of
docs/benchmarks.md and on planted clusters: the silhouette keeps rising past the labelled
number of classes on microscopy codes (they form sub-groups), CH does not.
:attr:`KScores.unclear` says when the scores give no clear ``K`` (CH still rising at the
largest ``K`` scored or falling from the smallest one above 2, k-means runs that disagree at
the suggested ``K``, or a flat silhouette); ``best`` is then
only the top of the range's scores, not a number of classes.

Everything here is napari-free; the napari widget (``_widgets/_suggest.py``) and the
``napari-stego suggest-k`` command call :func:`suggest_for_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .cluster import ClusterConfig, assign, spherical_kmeans
from .errors import Cancelled, StegoError

Progress = Callable[[str, int, int], None]

BEST_RULE = "highest Calinski-Harabasz index (ties: the smaller K)"

# silhouettes of all K within this of each other: no K stands out
FLAT_SILHOUETTE = 0.02
# default ChooseKConfig.min_stability: k-means runs agreeing less than this (mean ARI) at the
# suggested K found no reproducible partition (planted clusters: 0.9-1; no clusters: 0-0.3)
MIN_STABILITY = 0.8

__all__ = [
    "BEST_RULE", "ChooseKConfig", "KScore", "KScores", "adjusted_rand_index", "best_k",
    "calinski_harabasz", "cosine_silhouette", "sample_model_codes", "suggest_for_model",
    "suggest_n_clusters",
]


@dataclass(frozen=True)
class ChooseKConfig:
    """Settings of :func:`suggest_n_clusters`.

    ``seeds``: k-means runs per ``K`` (their agreement is the stability; at least 2 for a
    stability score); ``max_points``: code vectors sampled (all when there are fewer);
    ``fit_fraction``: share of the sample each run is fitted on; ``min_stability``: the
    stability below which the suggested ``K`` is called unclear (the runs disagree about its
    partition); ``seed``: seeds the
    sampling and the runs (run ``r`` uses k-means seed ``seed + r``); ``cluster``: the k-means
    settings of every run.
    """

    seeds: int = 3
    max_points: int = 10_000
    fit_fraction: float = 0.8
    min_stability: float = MIN_STABILITY
    seed: int = 0
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True)
class KScore:
    """The scores of one ``K``.

    ``silhouette``: mean cosine silhouette in ``[-1, 1]`` (NaN when the runs found fewer than
    two non-empty clusters); ``stability``: mean pairwise ARI of the runs (NaN with one
    run); ``stability_min``: the lowest pairwise ARI; ``smallest``: share of the sample in the
    smallest cluster of the silhouette's labelling (0 when a cluster came out empty);
    ``calinski_harabasz``: the CH index of the same labelling (NaN like the silhouette).
    """

    k: int
    silhouette: float
    stability: float
    stability_min: float
    smallest: float
    calinski_harabasz: float = float("nan")


@dataclass(frozen=True)
class KScores:
    """The result of :func:`suggest_n_clusters`: one :class:`KScore` per ``K`` (ascending),
    the suggested ``best`` ``K`` and how it was chosen (``rule``)."""

    rows: tuple[KScore, ...]
    best: int
    n_points: int
    seeds: int
    rule: str
    current: int | None = None  # the K of the model the codes came from, if any
    min_stability: float = MIN_STABILITY

    @property
    def k_values(self) -> list[int]:
        return [r.k for r in self.rows]

    def row(self, k: int) -> KScore:
        """The scores of ``k`` (``KeyError`` if it was not scored)."""
        for r in self.rows:
            if r.k == k:
                return r
        raise KeyError(k)

    @property
    def unclear(self) -> str:
        """Why the scores give no clear ``K`` (``""`` when they do), in this order:

        * the suggested ``K`` is the largest one scored: CH still rises at the end of the range
          (as on codes that form a continuum, where any finer cut scores better);
        * it is the smallest one scored and above 2: smaller ``K`` may score higher;
        * the k-means runs disagree about its partition (stability under ``min_stability``):
          the codes have no reproducible partition into that many clusters, as when they form
          no clusters at all;
        * the silhouette hardly changes over the range (spread under
          :data:`FLAT_SILHOUETTE`): no ``K`` separates the codes better than another.

        Then ``best`` is only the top of the range's scores, not a number of classes.
        """
        sil = [r.silhouette for r in self.rows if not math.isnan(r.silhouette)]
        if len(self.rows) > 1 and self.best == self.rows[-1].k:
            return (f"no clear K: the suggested K ({self.best}) is the largest one scored, "
                    "the Calinski-Harabasz index still rises with K; judge the segmentations "
                    "of a few K by eye, or score a wider range")
        if len(self.rows) > 1 and self.best == self.rows[0].k and self.best > 2:
            return (f"no clear K: the suggested K ({self.best}) is the smallest one scored; "
                    "score smaller K too")
        stability = self.row(self.best).stability
        if stability < self.min_stability:  # False for NaN (one run: no stability)
            return (f"no clear K: the k-means runs disagree at K = {self.best} (stability "
                    f"{stability:.2f}, under {self.min_stability:g}), the codes show no "
                    "reproducible clusters; judge the segmentations of a few K by eye")
        if len(sil) > 1 and max(sil) - min(sil) < FLAT_SILHOUETTE:
            return (f"no clear K: the silhouette hardly changes with K (from {min(sil):.3f} "
                    f"to {max(sil):.3f}); judge the segmentations of a few K by eye")
        return ""

    def table(self) -> str:
        """A plain-text table: K, Calinski-Harabasz, silhouette, stability (mean / min),
        smallest cluster, with the suggested K marked ``<- best`` (and the model's own K
        ``(model)``)."""
        lines = [f"{'K':>3}  {'CH':>8}  {'silhouette':>10}  {'stability':>9}  {'(min)':>6}  "
                 f"{'smallest':>8}"]
        for r in self.rows:
            marks = []
            if r.k == self.best:
                marks.append("<- best")
            if r.k == self.current:
                marks.append("(model)")
            ch = f"{'-':>8}" if math.isnan(r.calinski_harabasz) else \
                f"{r.calinski_harabasz:>8.0f}"
            lines.append(f"{r.k:>3}  {ch}  {_fmt(r.silhouette, 10)}  {_fmt(r.stability, 9)}  "
                         f"{_fmt(r.stability_min, 6)}  {r.smallest * 100:>7.1f}%"
                         + ("  " + " ".join(marks) if marks else ""))
        lines.append(f"best K = {self.best}: {self.rule}; {self.n_points} code vectors, "
                     f"{self.seeds} k-means runs per K")
        if self.unclear:
            lines.append(self.unclear)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes ``None``)."""
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in asdict(r).items()} for r in self.rows]
        return dict(best=self.best, rule=self.rule, unclear=self.unclear or None,
                    n_points=self.n_points, seeds=self.seeds, current=self.current,
                    min_stability=self.min_stability, rows=rows)


def _fmt(value: float, width: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.3f}"


# ------------------------------------------------------------------------------ scores
def cosine_silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette of ``labels`` with the cosine distance ``1 - cos(x_i, x_j)``.

    Args:
        x: ``(N, D)`` vectors (any norm; normalised here).
        labels: ``(N,)`` integer cluster ids ``>= 0`` (ids need not be contiguous).

    Returns:
        the mean over points of ``(b - a) / max(a, b)``, ``a`` the mean distance to the other
        members of the own cluster, ``b`` the lowest mean distance to another cluster; points
        alone in their cluster count 0 (as scikit-learn). NaN when fewer than two clusters
        are used. Exact, in ``O(N K D)`` time and ``O(N K)`` memory.
    """
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, D) and labels (N,), got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}")
    _, labels = torch.unique(labels.cpu(), return_inverse=True)
    k = int(labels.max()) + 1 if labels.numel() else 0
    if k < 2:
        return float("nan")
    x = F.normalize(x.detach().cpu().double(), dim=1)
    onehot = F.one_hot(labels, k).double()                       # (N, K)
    counts = onehot.sum(0)                                       # (K,)
    sim = x @ (onehot.T @ x).T                                   # (N, K): sum of cosines
    rows = torch.arange(x.shape[0])
    n_own = counts[labels]
    self_sim = (x * x).sum(1)                                    # 1 (0 for a zero vector)
    a = 1 - (sim[rows, labels] - self_sim) / (n_own - 1).clamp_min(1)
    mean_dist = 1 - sim / counts
    mean_dist[rows, labels] = float("inf")
    b = mean_dist.min(1).values
    denom = torch.maximum(a, b)
    s = torch.where(denom > 0, (b - a) / denom.clamp_min(1e-300), torch.zeros_like(a))
    s = torch.where(n_own > 1, s, torch.zeros_like(s))
    return float(s.mean())


def calinski_harabasz(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Calinski-Harabasz index of ``labels`` on the unit-normalised rows of ``x``.

    Args:
        x: ``(N, D)`` vectors (any norm; normalised here, so the squared distances are
            ``2 - 2 cos``).
        labels: ``(N,)`` integer cluster ids (ids need not be contiguous).

    Returns:
        ``(B / (K - 1)) / (W / (N - K))`` with ``B`` and ``W`` the between- and within-cluster
        sums of squared distances to the cluster means (as scikit-learn's
        ``calinski_harabasz_score``). NaN with fewer than two clusters or ``N <= K``; ``inf``
        when every cluster is a single point repeated.
    """
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, D) and labels (N,), got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}")
    _, labels = torch.unique(labels.cpu(), return_inverse=True)
    n = x.shape[0]
    k = int(labels.max()) + 1 if labels.numel() else 0
    if k < 2 or n <= k:
        return float("nan")
    x = F.normalize(x.detach().cpu().double(), dim=1)
    counts = torch.bincount(labels, minlength=k).double()
    means = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    means /= counts[:, None]
    within = float(((x - means[labels]) ** 2).sum())
    between = float((counts * ((means - x.mean(0)) ** 2).sum(1)).sum())
    if within == 0:
        return float("inf")
    return (between / (k - 1)) / (within / (n - k))


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two labellings of the same points (Hubert & Arabie 1985).

    Args:
        a, b: ``(N,)`` integer labels (numpy or torch; ids need not be contiguous).

    Returns:
        1 for identical partitions (up to renaming), about 0 for independent ones, down to
        -1 for worse than chance; 1 when both are trivial (one cluster each, or all singletons)
        as in scikit-learn.
    """
    from .metrics import confusion_matrix

    a = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a).ravel()
    b = np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labellings differ in length: {a.size} vs {b.size}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = confusion_matrix(ai, bi, int(ai.max()) + 1, int(bi.max()) + 1,
                             ignore_index=-1).astype(np.float64)

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    index = pairs(table)
    sa, sb = pairs(table.sum(1)), pairs(table.sum(0))
    expected = sa * sb / (n * (n - 1) / 2)
    maximum = (sa + sb) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def best_k(rows: Sequence[KScore]) -> int:
    """The suggested ``K`` of scored ``rows`` (the rule in :data:`BEST_RULE`): the highest
    Calinski-Harabasz index, ties to the smaller ``K``; the smallest ``K`` when no row has
    one (degenerate data)."""
    if not rows:
        raise ValueError("no K scored")
    scored = [r for r in rows if not math.isnan(r.calinski_harabasz)]
    if not scored:
        return min(r.k for r in rows)
    return min(scored, key=lambda r: (-r.calinski_harabasz, r.k)).k


# ------------------------------------------------------------------------------ from codes
def suggest_n_clusters(codes: torch.Tensor, k_values: Iterable[int] = range(2, 13), *,
                       config: ChooseKConfig | None = None, seeds: int | None = None,
                       max_points: int | None = None, seed: int | None = None,
                       progress: Progress | None = None, cancel=None,
                       current: int | None = None) -> KScores:
    """Score each ``K`` in ``k_values`` on code vectors, without labels.

    Args:
        codes: ``(N, D)`` code vectors (any norm). More than ``max_points`` are subsampled
            (seeded).
        k_values: the ``K`` to score, each ``>= 2`` (sorted, duplicates dropped).
        config: all settings; ``seeds``, ``max_points`` and ``seed`` are shortcuts for the
            same fields.
        progress: ``progress("score", k_done, k_total)`` after each ``K``.
        cancel: anything with ``is_set()``; checked before every k-means run.
        current: the ``K`` of the model the codes came from (marked in the table).

    Returns:
        :class:`KScores`; ``best`` follows :data:`BEST_RULE`.

    Raises:
        StegoError: no codes, a ``K`` below 2 or above the number of sampled vectors.
        Cancelled: ``cancel`` was set.
    """
    config = config or ChooseKConfig()
    overrides = {k: v for k, v in dict(seeds=seeds, max_points=max_points, seed=seed).items()
                 if v is not None}
    config = replace(config, **overrides)
    if config.seeds < 1 or config.max_points < 2 or not 0 < config.fit_fraction <= 1:
        raise StegoError(f"bad settings: seeds {config.seeds} (>= 1), max_points "
                         f"{config.max_points} (>= 2), fit_fraction {config.fit_fraction} "
                         "(in (0, 1])")
    ks = sorted({int(k) for k in k_values})
    if not ks:
        raise StegoError("no K to score: give at least one K >= 2")
    if ks[0] < 2:
        raise StegoError(f"K must be at least 2 to be scored (got {ks[0]}): a silhouette "
                         "needs two clusters")
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise StegoError(f"codes must be a non-empty (N, D) tensor, got shape "
                         f"{tuple(codes.shape)}: no usable images?")
    gen = torch.Generator().manual_seed(config.seed)
    x = codes.detach().cpu()
    if x.shape[0] > config.max_points:
        x = x[torch.randperm(x.shape[0], generator=gen)[: config.max_points]]
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    if ks[-1] > n:
        raise StegoError(f"K = {ks[-1]} is more than the {n} code vectors sampled: use a "
                         "smaller K or more / bigger images")
    m = max(ks[-1], min(n, round(config.fit_fraction * n)))
    subsets = [torch.randperm(n, generator=gen)[:m] for _ in range(config.seeds)]

    rows = []
    for i, k in enumerate(ks):
        labelings, fits = [], []
        for r, subset in enumerate(subsets):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"choosing K cancelled at K = {k}")
            centroids = spherical_kmeans(x[subset], k, seed=config.seed + r,
                                         config=config.cluster)
            labels = assign(x, centroids)
            labelings.append(labels)
            fits.append(float((x * centroids[labels]).sum(1).mean()))
        pair_scores = [adjusted_rand_index(labelings[p], labelings[q])
                       for p in range(len(labelings)) for q in range(p + 1, len(labelings))]
        chosen = labelings[int(np.argmax(fits))]
        sizes = torch.bincount(chosen, minlength=k)
        rows.append(KScore(
            k=k, silhouette=cosine_silhouette(x, chosen),
            stability=float(np.mean(pair_scores)) if pair_scores else float("nan"),
            stability_min=float(np.min(pair_scores)) if pair_scores else float("nan"),
            smallest=float(sizes.min()) / n, calinski_harabasz=calinski_harabasz(x, chosen)))
        if progress is not None:
            progress("score", i + 1, len(ks))
    return KScores(tuple(rows), best_k(rows), n, config.seeds, BEST_RULE, current,
                   config.min_stability)


# ------------------------------------------------------------------------------ from a model
def sample_model_codes(model, images, *, max_points: int = 10_000, seed: int = 0,
                       progress: Progress | None = None, cancel=None) -> torch.Tensor:
    """A uniform random sample of a model's code vectors over many images.

    Args:
        model: a :class:`~napari_stego.model.StegoModel` (anything with
            ``codes(image) -> (D, h, w)``).
        images: one image / an ``(N, H, W[, 3])`` stack (array), or an iterable whose items
            are images, stacks or lists of images (items may be read lazily, e.g. one file
            each; an empty item is skipped).
        max_points: the sample size (all vectors when there are fewer).
        progress: ``progress("codes", items_done, items_total)`` after each item
            (``items_total`` 0 when ``images`` has no length).

    Returns:
        ``(min(max_points, total cells), D)`` float32 codes, uniform over all feature-grid
        cells of all images. Memory stays at ``max_points`` vectors plus one image's codes
        (reservoir sampling with random priorities; seeded).

    Raises:
        StegoError: unreadable images (as :meth:`StegoModel.codes`).
        Cancelled: ``cancel`` was set.
    """
    from .io import image_list

    if isinstance(images, np.ndarray) or (hasattr(images, "__array__")
                                          and not isinstance(images, (list, tuple))):
        items: Iterable = image_list(images)
    else:
        items = images
    total = len(items) if isinstance(items, Sized) else 0
    gen = torch.Generator().manual_seed(seed)
    kept: torch.Tensor | None = None
    keys = torch.empty(0)
    done = 0
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 0):
            for image in image_list(item):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"choosing K cancelled after {done} images")
                code = model.codes(image)
                vectors = code.reshape(code.shape[0], -1).T.float()          # (h w, D)
                prio = torch.rand(vectors.shape[0], generator=gen)
                if kept is not None:
                    vectors, prio = torch.cat([kept, vectors]), torch.cat([keys, prio])
                if vectors.shape[0] > max_points:
                    keys, idx = torch.topk(prio, max_points, largest=False)
                    kept = vectors[idx]
                else:
                    kept, keys = vectors, prio
        done += 1
        if progress is not None:
            progress("codes", done, total)
    if kept is None:
        raise StegoError("no images to compute codes of")
    return kept


def suggest_for_model(model, images, k_values: Iterable[int] = range(2, 13), *,
                      config: ChooseKConfig | None = None, seeds: int | None = None,
                      max_points: int | None = None, seed: int | None = None,
                      progress: Progress | None = None, cancel=None) -> KScores:
    """Score each ``K`` on the codes a fitted model gives ``images``.

    ``images`` as in :func:`sample_model_codes`; the sample has ``config.max_points``
    vectors. ``progress`` gets ``"codes"`` (per image item) then ``"score"`` (per ``K``).
    The model's own ``K`` is marked in the table. See :func:`suggest_n_clusters`.
    """
    config = config or ChooseKConfig()
    overrides = {k: v for k, v in dict(seeds=seeds, max_points=max_points, seed=seed).items()
                 if v is not None}
    config = replace(config, **overrides)
    codes = sample_model_codes(model, images, max_points=config.max_points, seed=config.seed,
                               progress=progress, cancel=cancel)
    current = getattr(model, "n_clusters", None)
    return suggest_n_clusters(codes, k_values, config=config, progress=progress, cancel=cancel,
                              current=int(current) if current is not None else None)
