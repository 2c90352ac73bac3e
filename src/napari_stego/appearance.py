"""Appearance in the distilled signal: what a scientist sees (stain, colour, brightness).

STEGO distils the backbone's feature correlations; their strongest directions are often not
the ones a stain or a brightness level defines (blood smears, two-channel fluorescence,
solar images). This module adds an *appearance affinity* to the correlation target:

* **Descriptors**: the mean colour of every feature cell, in the normalised [0, 1] units of
  the intensity mapping the backbone and the CRF see (:func:`appearance_map`).
* **Affinity**: a Gaussian kernel of the colour distance, ``exp(-|a - a'|^2 / 2 sigma^2)``,
  written as a dot product of random Fourier features (Rahimi & Recht, 2007), so that the
  blended target ``(1 - w) * feature_corr + w * appearance_affinity`` is the cosine
  correlation of one concatenated teacher vector ``[sqrt(1 - w) f/|f|, sqrt(w) z(a)]`` and
  the loss's spatial centring and the automatic shifts apply to it unchanged
  (:class:`AppearanceTeacher`). ``sigma`` is the median distance between cells' colours
  (the median heuristic). The head still sees only the backbone features; after training
  the clusters are found on the same blend with the codes in place of the features
  (:class:`ColourSpace`), so prediction adds the colour part of each cluster's score.
* **Weight rule** (no labels): ``w = max_weight * s`` where ``s`` says how much better
  k-means with K clusters splits the cells' colours than it splits a Gaussian cloud with the
  same mean and covariance (:func:`appearance_weight`):
  ``s = clip((R2 - R2_gauss) / (1 - R2_gauss), 0, 1)``, ``R2`` the between-cluster fraction
  of the colour variance. Colours that fall into separate groups (stains, bright vs dark
  classes) give ``s`` near 1; colour noise or textures of one mean colour give a Gaussian-
  like cloud and ``s`` near 0. Grouped colours are not enough, though: street scenes' colours
  group as clearly as a blood smear's, and there colour misleads. So the weight is gated by
  whether the colours group *more clearly than the backbone's own leading directions do*:
  ``s_f`` is the same measure on the unit features' first three principal components (as many
  dimensions as the colours), and ``w = max_weight * s * clip((s - s_f) / 0.1, 0, 1)``. Where
  the features already fall into clear groups (street scenes, texture mosaics) the target
  stays theirs; where they do not and the colours do (stains), appearance enters.
  Grouped colours must also make *regions*: a class that a stain or a brightness level
  defines covers neighbouring cells, so the cells' colour groups (nearest k-means centre)
  mostly agree with their neighbours'. Where brightness is texture (electron micrographs,
  whose dark membranes are one cell wide amid dark organelles; grey texture mosaics) the
  groups speckle. ``coherence`` is Cohen's kappa of the groups of 4-neighbour cell pairs
  (0: as speckled as random groups of the same sizes, 1: every neighbour agrees), and a
  second gate ``clip((coherence - 0.45) / 0.1, 0, 1)`` multiplies the weight. On the six
  visible sets: ISBI 0.41 (closed), the texture mosaics 0.25, CamVid 0.61, the stains and
  nuclei 0.83-0.94; drawn solar disks (``benchmarks/standins.py``) 0.90. It replaced a
  uniform-cloud reference (the colours had to split more clearly than a uniform cloud of
  their covariance), which closed ISBI too but also the solar disks, whose broad, evenly
  spread brightness splits no better than a uniform cloud although it is the class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import StegoError

FEATURE_DIMS = 3  # principal directions of the features the gate compares with the colours
GATE_WIDTH = 0.1  # the gate opens over this much more separability of the colours
COHERENCE_MIN = 0.45  # the colour groups' neighbour agreement (kappa) where the gate opens


@dataclass(frozen=True)
class AppearanceConfig:
    """How much of the correlation target comes from appearance.

    ``weight``: ``None`` (the default) chooses it from the data (:func:`appearance_weight`);
    a number in [0, 1] fixes it; 0 turns appearance off. With the gated rule the six visible
    benchmark sets gained 2.6 mIoU on average over appearance off (one seed; the blood smear
    with one white cell +24, the fluorescence nuclei -4, ISBI -7, CamVid and the texture
    mosaics unchanged: the gate closed; docs/benchmarks.md run 8). The coherence gate
    (``groups``) closes it on ISBI's speckled grey levels (STEGO + CRF 55.7 -> 60.5 over three
    seeds, run 11, when a uniform reference closed it) and keeps it on regions of one
    brightness (drawn solar disks). ``max_weight``: the weight
    when the colours split perfectly and the gate is open. ``n_fourier``: random Fourier
    features of the Gaussian kernel. ``max_points``: cells the rule clusters.
    """

    weight: float | None = None
    max_weight: float = 1.0
    n_fourier: int = 256
    max_points: int = 20_000

    def __post_init__(self):
        for name in ("weight", "max_weight"):
            v = getattr(self, name)
            if v is None and name == "weight":
                continue
            if not isinstance(v, (int, float, np.number)) or not 0.0 <= float(v) <= 1.0:
                raise StegoError(f"AppearanceConfig.{name} must be a number in [0, 1], got {v!r}")


def appearance_map(rgb: np.ndarray, grid: tuple[int, int], stride: int,
                   work: tuple[int, int]) -> torch.Tensor:
    """Mean colour of every feature cell: ``(3, h, w)`` float32 in [0, 1].

    Args:
        rgb: the image as the backbone sees it before its normalisation, ``(H, W, 3)`` in
            [0, 1] (:func:`napari_stego.intensity.to_rgb`).
        grid: the feature grid ``(h, w)``.
        stride: image pixels per cell of the work image.
        work: the size the image is resized to for the backbone
            (:func:`~napari_stego.features.work_size`).
    """
    return cell_colours(work_rgb(rgb, work), grid, stride)


def work_rgb(rgb: np.ndarray, work: tuple[int, int]) -> torch.Tensor:
    """The image as the backbone sees it, ``(H, W, 3)`` in [0, 1], resized to the ``work``
    size: ``(3, *work)`` float32."""
    t = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    if tuple(t.shape[-2:]) != tuple(work):
        t = F.interpolate(t, size=tuple(work), mode="bilinear", align_corners=False)
    return t[0]


def _sample(maps: Sequence[torch.Tensor], n: int, gen: torch.Generator,
            also: Sequence[torch.Tensor] | None = None):
    """About ``n`` random cells of ``maps`` (spread over the maps by their sizes) as an
    ``(n, C)`` float64 array; with ``also`` (maps of the same grids) the same cells of those
    too: ``(x, y)``."""
    cells = [m.shape[-2] * m.shape[-1] for m in maps]
    total = sum(cells)
    parts, others = [], []
    for i, (m, c) in enumerate(zip(maps, cells)):
        k = max(1, round(n * c / total)) if total > n else c
        idx = torch.randperm(c, generator=gen)[: min(k, c)]
        parts.append(m.flatten(1)[:, idx].T.float())
        if also is not None:
            others.append(also[i].flatten(1)[:, idx].T.float())
    x = torch.cat(parts).numpy().astype(np.float64)
    return x if also is None else (x, torch.cat(others).numpy().astype(np.float64))


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 3) -> tuple[float, np.ndarray]:
    """The lowest within-cluster sum of squares of ``x (N, C)`` over k-means++ restarts,
    and its centres ``(k, C)``."""
    from scipy.cluster.vq import kmeans2

    best = (math.inf, np.zeros((k, x.shape[1])))
    for run in range(n_init):
        centres, labels = kmeans2(x, k, minit="++", seed=seed * n_init + run)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best[0]:
            best = (inertia, centres)
    return best


def _r2(x: np.ndarray, k: int, seed: int, n_init: int = 3,
        fit: tuple[float, np.ndarray] | None = None) -> float:
    """Best between-cluster fraction of the variance of ``x (N, C)`` over k-means restarts
    (``fit``: that k-means' result when already at hand)."""
    total = float(((x - x.mean(0)) ** 2).sum())
    if total <= 1e-12:
        return 0.0
    inertia = (fit or _kmeans(x, k, seed, n_init))[0]
    return 1.0 - inertia / total


def coherence(maps: Sequence[torch.Tensor], centres: np.ndarray) -> float:
    """How much the cells' colour groups make regions: Cohen's kappa of the groups of
    horizontally and vertically neighbouring cells.

    Args:
        maps: appearance maps ``(3, h, w)`` (or any ``(C, h, w)`` maps: the regions' rule of
            :mod:`napari_stego.shifts` passes feature maps).
        centres: ``(K, C)`` group centres; a cell's group is its nearest centre (Euclidean;
            for unit centres the most similar by cosine).

    Returns:
        ``(p_same - p_chance) / (1 - p_chance)``: ``p_same`` the fraction of neighbour pairs in
        one group, ``p_chance`` that fraction for groups of the same sizes placed at random;
        0.0 when there is no neighbour pair or one group holds every cell.
    """
    c = torch.as_tensor(centres, dtype=torch.float32)
    same = pairs = 0
    counts = torch.zeros(len(c), dtype=torch.float64)
    for m in maps:
        x = m.float().permute(1, 2, 0)  # (h, w, 3)
        g = torch.cdist(x.reshape(-1, x.shape[-1]), c.to(x.device)).argmin(1).reshape(x.shape[:2])
        g = g.cpu()
        counts += torch.bincount(g.flatten(), minlength=len(c)).double()
        same += int((g[1:] == g[:-1]).sum()) + int((g[:, 1:] == g[:, :-1]).sum())
        pairs += g[1:].numel() + g[:, 1:].numel()
    p = counts / counts.sum().clamp_min(1)
    chance = float((p ** 2).sum())
    if pairs == 0 or chance >= 1.0 - 1e-9:
        return 0.0
    return (same / pairs - chance) / (1.0 - chance)


def coherence_gate(kappa: float) -> float:
    """The coherence gate: ``clip((kappa - COHERENCE_MIN) / GATE_WIDTH, 0, 1)``, 0 where the
    groups speckle, 1 where they make regions (:func:`coherence`'s ``kappa``)."""
    return float(np.clip((kappa - COHERENCE_MIN) / GATE_WIDTH, 0.0, 1.0))


def _reference(x: np.ndarray, seed: int) -> np.ndarray:
    """A Gaussian cloud (no groups) with the mean and covariance of ``x (N, C)``."""
    rng = np.random.default_rng(seed)
    vals, vecs = np.linalg.eigh(np.cov(x.T) + 1e-12 * np.eye(x.shape[1]))
    z = rng.standard_normal(x.shape)
    return x.mean(0) + (z * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def _excess(r2: float, r2_ref: float) -> float:
    """``(R2 - R2_ref) / (1 - R2_ref)`` clipped to [0, 1]."""
    return float(np.clip((r2 - r2_ref) / max(1.0 - r2_ref, 1e-6), 0.0, 1.0))


def separability(x: np.ndarray, k: int, seed: int = 0
                 ) -> tuple[float, float, float, np.ndarray]:
    """How much better k-means with ``k`` clusters splits the points ``x (N, C)`` than it
    splits a Gaussian cloud with their mean and covariance: ``(s, R2, R2_gauss, centres)``
    with ``s = clip((R2 - R2_gauss) / (1 - R2_gauss), 0, 1)``, ``R2`` the between-cluster
    fraction of the variance (see the module doc) and ``centres`` ``(k, C)`` that k-means'."""
    fit = _kmeans(x, k, seed)
    r2 = _r2(x, k, seed, fit=fit)
    r2_gauss = _r2(_reference(x, seed), k, seed)
    return _excess(r2, r2_gauss), r2, r2_gauss, fit[1]


def _feature_separability(f: np.ndarray, k: int, seed: int) -> float:
    """:func:`separability` of unit feature vectors ``f (N, D)`` in their first
    :data:`FEATURE_DIMS` principal directions (as many dimensions as the colours have)."""
    u = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    u = u - u.mean(0)
    _, vecs = np.linalg.eigh(u.T @ u)  # (D, D): far cheaper than an SVD of the (N, D) cells
    return separability(u @ vecs[:, ::-1][:, :FEATURE_DIMS], k, seed)[0]


def appearance_weight(maps: Sequence[torch.Tensor], n_clusters: int | None,
                      config: AppearanceConfig = AppearanceConfig(),
                      seed: int = 0,
                      features: Sequence[torch.Tensor] | None = None) -> tuple[float, dict]:
    """The appearance weight of a fit and a report of how it was chosen (see module doc).

    Args:
        maps: appearance maps ``(3, h, w)`` (:func:`appearance_map`).
        n_clusters: ``K`` of the fit (``None`` or < 2: 2).
        features: the backbone feature maps ``(D, h, w)`` of the same cells; with them the
            weight is also gated by how much more clearly the colours fall into groups than
            the features' leading directions do (``gate``; without them the gate is 1).

    Returns:
        ``(w, report)``; the report holds ``separability`` (of the colours),
        ``feature_separability``, ``gate``, ``r2``, ``r2_gauss``, ``coherence``, ``groups``
        (the gate of the coherence) and ``weight``.
    """
    if config.weight is not None:
        return float(config.weight), dict(weight=float(config.weight), rule="fixed")
    gen = torch.Generator().manual_seed(seed)
    if features is None:
        x, f = _sample(maps, config.max_points, gen), None
    else:
        x, f = _sample(maps, config.max_points, gen, also=features)
    k = max(int(n_clusters or 2), 2)
    if len(x) <= k:
        return 0.0, dict(weight=0.0, rule="too few cells")
    sep, r2, r2_gauss, centres = separability(x, k, seed)
    coh = coherence(maps, centres)
    groups = coherence_gate(coh)
    report = dict(rule="auto", r2=round(r2, 4), r2_gauss=round(r2_gauss, 4),
                  separability=round(sep, 4), k=k, coherence=round(coh, 4),
                  groups=round(groups, 4))
    gate = 1.0
    if f is not None:
        sep_f = _feature_separability(f, k, seed)
        gate = float(np.clip((sep - sep_f) / GATE_WIDTH, 0.0, 1.0))
        report.update(feature_separability=round(sep_f, 4), gate=round(gate, 4))
    w = round(config.max_weight * sep * gate * groups, 4)
    report["weight"] = w
    return w, report


def median_distance(maps: Sequence[torch.Tensor], seed: int = 0, n: int = 2000) -> float:
    """Median Euclidean distance between the colours of random cell pairs (kernel width)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(_sample(maps, n, gen)).float()
    d = torch.cdist(x, x)
    d = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    med = float(d.median()) if d.numel() else 0.0
    return med if med > 1e-6 else 1.0


class AppearanceTeacher:
    """Turns training points ``(B, D + 3, ...)`` (features, then the cell colours) into the
    teacher vectors whose cosine correlation is the blended target (see module doc).

    ``features(x)`` is what the head sees (the first ``D`` channels).
    """

    def __init__(self, dim: int, weight: float, sigma: float, n_fourier: int = 256,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed + 7)
        self.dim = dim
        self.weight = float(weight)
        self.sigma = float(sigma)
        self.omega = torch.randn(n_fourier, 3, generator=gen) / self.sigma
        self.phase = torch.rand(n_fourier, generator=gen) * 2 * math.pi
        self.scale = math.sqrt(2.0 / n_fourier)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.dim]

    def fourier(self, colours: torch.Tensor) -> torch.Tensor:
        """``(B, 3, ...)`` colours -> ``(B, M, ...)`` with ``z(a) . z(a') ~ exp(-|a-a'|^2/2s^2)``."""
        omega, phase = self.omega.to(colours), self.phase.to(colours)
        proj = torch.einsum("mc,bc...->bm...", omega, colours)
        return self.scale * torch.cos(proj + phase.view(1, -1, *([1] * (colours.ndim - 2))))

    def __call__(self, x: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher vectors of points ``x``; ``feats`` replaces ``x``'s feature part (e.g. after
        the teacher's channel dropout)."""
        f = self.features(x) if feats is None else feats
        f = F.normalize(f.float(), dim=1, eps=1e-10)
        z = self.fourier(x[:, self.dim:].float())
        return torch.cat([math.sqrt(1.0 - self.weight) * f, math.sqrt(self.weight) * z], dim=1)


@dataclass(frozen=True)
class ColourSpace:
    """Where the clusters live after a fit with appearance in its target.

    The head is trained so that its codes' correlations reproduce those of the teacher vector
    ``[sqrt(1 - w) f/|f|, sqrt(w) z(a)]`` (:class:`AppearanceTeacher`). k-means and the
    refinement then run on the same vector with the codes in place of the features,
    ``v = [sqrt(1 - w) c/|c|, sqrt(w) z(a)]`` (``a`` the cell's mean colour), so a cluster
    is decided by what the target was: the codes and, with weight ``w``, the colour. A
    centroid ``(theta_c, theta_z)`` scores a pixel by ``v . theta``; the code part is taken
    at the pixel (the up-sampled code), the colour part ``z(a) . theta_z`` on the cells and
    up-sampled with them (it is linear in ``z``, so that equals up-sampling ``z``).

    ``weight``, ``sigma``, ``n_fourier`` and ``seed`` are the fit's appearance weight and
    kernel (the same random Fourier features as the teacher). ``weight == 0``: no colour.
    """

    weight: float = 0.0
    sigma: float = 1.0
    n_fourier: int = 256
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= float(self.weight) < 1.0 or not float(self.sigma) > 0 \
                or int(self.n_fourier) < 1:
            raise StegoError(f"bad ColourSpace {self!r}")

    @property
    def active(self) -> bool:
        return self.weight > 0

    def _z(self, colours: torch.Tensor) -> torch.Tensor:
        teacher = AppearanceTeacher(0, self.weight, self.sigma, self.n_fourier, self.seed)
        return teacher.fourier(colours.float())

    def vectors(self, codes: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` codes and ``(N, 3)`` colours of the same cells -> ``(N, C + M)``."""
        c = F.normalize(codes.float(), dim=1) * math.sqrt(1.0 - self.weight)
        return torch.cat([c, math.sqrt(self.weight) * self._z(colours.to(c.device))], dim=1)

    def split(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, C + M)`` unit centroids of :meth:`vectors` -> the code part ``(K, C)`` and
        the colour part ``(K, M)``, each as stored in a model."""
        return centroids[:, : -self.n_fourier], centroids[:, -self.n_fourier:]

    def code_weights(self, code_centroids: torch.Tensor) -> torch.Tensor:
        """The code part as it multiplies a unit code: ``sqrt(1 - w) theta_c``."""
        return math.sqrt(1.0 - self.weight) * code_centroids

    def colour_scores(self, colours: torch.Tensor, colour_centroids: torch.Tensor) -> torch.Tensor:
        """``(B, 3, h, w)`` cell colours -> ``(B, K, h, w)`` colour part of the scores."""
        z = self._z(colours)
        return math.sqrt(self.weight) * torch.einsum("bmhw,km->bkhw", z,
                                                     colour_centroids.to(z))


def cell_colours(rgb: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Mean colour of every cell of ``grid`` from a work image ``(3, H, W)`` (already at the
    backbone's size) padded as the backbone pads (replicate, bottom and right):
    ``(3, h, w)``."""
    t = rgb.float()[None]
    h, w = grid
    ph, pw = max(h * stride - t.shape[-2], 0), max(w * stride - t.shape[-1], 0)
    if ph or pw:
        t = F.pad(t, (0, pw, 0, ph), mode="replicate")
    return F.avg_pool2d(t[..., : h * stride, : w * stride], stride)[0]


def cell_moments(rgb: torch.Tensor, grid: tuple[int, int], stride: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean colour ``(3, h, w)`` and colour variance ``(1, h, w)`` (summed over the three
    channels) of every cell of ``grid`` from a work image ``(3, H, W)``, padded as
    :func:`cell_colours` pads."""
    mean = cell_colours(rgb, grid, stride)
    square = cell_colours(rgb.float() ** 2, grid, stride)
    return mean, (square - mean ** 2).sum(0, keepdim=True).clamp_min(0)


def with_appearance(maps: Sequence[torch.Tensor], images: Sequence[np.ndarray], stride: int,
                    config) -> list[torch.Tensor]:
    """Feature maps ``(D, h, w)`` with each cell's colour appended: ``(D + 3, h, w)``.

    ``config``: the fit's :class:`~napari_stego.features.FeatureConfig` (intensity mapping
    and ``min_side``), so the colours are in the units the backbone and the CRF see.
    """
    from .features import work_size
    from .intensity import to_rgb

    out = []
    for m, im in zip(maps, images):
        colours = appearance_map(to_rgb(im, config.intensity), tuple(m.shape[-2:]), stride,
                                 work_size(im.shape[:2], config.min_side))
        out.append(torch.cat([m, colours.to(m.dtype)]))
    return out


def stores_with_appearance(stores, sources, stats, stride: int, config,
                           budget: int = 512 * 2**20) -> list[torch.Tensor] | None:
    """Every plane of feature stores as an in-memory ``(D + 3, h, w)`` tensor with its cells'
    colours (mapped with the stack's own intensity statistics ``stats``), or ``None`` when
    that would take more than ``budget`` bytes (the fit then trains on the features alone)."""
    from .features import work_size

    total = sum(s.layout.n_planes * (s.layout.dim + 3) * s.layout.height * s.layout.width * 2
                for s in stores)
    if total > budget:
        return None
    out = []
    for store, src, st in zip(stores, sources, stats):
        work = work_size(src.shape2d, config.min_side)
        for plane in range(src.n_planes):
            f = torch.from_numpy(np.asarray(store.read(plane)))
            colours = appearance_map(st.apply(src.block(plane)), tuple(f.shape[-2:]), stride, work)
            out.append(torch.cat([f, colours.to(f.dtype)]))
    return out
