"""Candidate rules for Suggest K, compared on saved code vectors (no fitting).

Usage:
    python benchmarks/suggest_k.py --data ../shared/data --save-codes /tmp/k_codes   # once
    python benchmarks/suggest_k_rules.py --data ../shared/data --codes /tmp/k_codes

For each dataset's saved codes (``suggest_k.py --save-codes``) the k-means runs of
``choose_k.suggest_n_clusters`` are repeated for K = 1..12 (same sample, subsets and seeds)
and their labellings kept; every candidate rule below then picks a K (or ``None``: "no clear
K") from the same statistics: cosine silhouette, stability (mean ARI of the runs), the
distortion (mean ``1 - cos`` to the own centroid), Calinski-Harabasz and Davies-Bouldin (on
the unit vectors, Euclidean) and the gap statistic (Tibshirani et al. 2001; reference data
uniform in the box of the sample's principal axes, ``--refs`` sets, 2 k-means restarts of
at most 50 iterations each). The label maps are never
read; ``num_classes`` of ``meta.json`` is only compared with each pick. Prints one JSON object:
per rule the picks, how many are within +-1 of the labelled K and how many say "no clear K";
per dataset the statistics.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quality import dataset_dirs

from napari_stego.choose_k import (
    BEST_RULE,
    FLAT_SILHOUETTE,
    KScore,
    KScores,
    adjusted_rand_index,
    best_k,
    cosine_silhouette,
)
from napari_stego.cluster import ClusterConfig, assign, spherical_kmeans

# the reference sets have no clusters to find: fewer restarts and iterations
REF_KMEANS = ClusterConfig(n_init=2, n_iter=50)


def distortion(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean ``1 - cos`` between each unit vector and its cluster's (normalised) mean."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x.double())
    return float(1 - (x.double() * F.normalize(sums, dim=1)[labels]).sum(1).mean())


def ch_db(x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Calinski-Harabasz and Davies-Bouldin of ``labels`` on ``x`` (Euclidean)."""
    x = x.double()
    _, labels = torch.unique(labels, return_inverse=True)
    k, n = int(labels.max()) + 1, x.shape[0]
    if k < 2:
        return float("nan"), float("nan")
    counts = torch.bincount(labels, minlength=k).double()
    means = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    means /= counts[:, None]
    within = float(((x - means[labels]) ** 2).sum())
    total = float(((x - x.mean(0)) ** 2).sum())
    ch = ((total - within) / (k - 1)) / (within / (n - k))
    spread = torch.zeros(k, dtype=torch.float64).index_add_(
        0, labels, (x - means[labels]).norm(dim=1)) / counts
    sep = torch.cdist(means, means)
    ratio = (spread[:, None] + spread[None, :]) / sep
    ratio.fill_diagonal_(-math.inf)
    db = float(ratio.max(1).values.mean())
    return ch, db


def fit_labels(x, k, subsets, seed, n_runs):
    labelings, fits = [], []
    for r in range(n_runs):
        c = spherical_kmeans(x[subsets[r]], k, seed=seed + r)
        lab = assign(x, c)
        labelings.append(lab)
        fits.append(float((x * c[lab]).sum(1).mean()))
    return labelings, int(np.argmax(fits))


def reference_sets(x: torch.Tensor, n_refs: int, seed: int) -> list[torch.Tensor]:
    """Uniform data in the box of ``x``'s principal axes (Tibshirani's 'b' reference),
    unit-normalised like the codes."""
    gen = torch.Generator().manual_seed(seed + 1000)
    xd = x.double()
    mean = xd.mean(0)
    _, _, vt = torch.linalg.svd(xd - mean, full_matrices=False)
    proj = (xd - mean) @ vt.T
    lo, hi = proj.min(0).values, proj.max(0).values
    refs = []
    for _ in range(n_refs):
        u = torch.rand(proj.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
        refs.append(F.normalize((u @ vt + mean).float(), dim=1))
    return refs


def statistics(codes: torch.Tensor, ks: list[int], *, runs: int = 3, seed: int = 0,
               n_refs: int = 5, fit_fraction: float = 0.8, max_points: int = 10_000) -> dict:
    """Per K: silhouette, stability, distortion, CH, DB, gap (and its s.e.); as
    ``suggest_n_clusters`` draws the sample and the run subsets."""
    gen = torch.Generator().manual_seed(seed)
    x = codes.detach().cpu()
    if x.shape[0] > max_points:
        x = x[torch.randperm(x.shape[0], generator=gen)[:max_points]]
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    m = max(max(ks), min(n, round(fit_fraction * n)))
    subsets = [torch.randperm(n, generator=gen)[:m] for _ in range(runs)]
    refs = reference_sets(x, n_refs, seed)
    out = {}
    for k in ks:
        if k == 1:
            lab = torch.zeros(n, dtype=torch.long)
            row = dict(silhouette=float("nan"), stability=1.0, stability_min=1.0,
                       smallest=1.0, ch=float("nan"), db=float("nan"))
        else:
            labelings, best = fit_labels(x, k, subsets, seed, runs)
            lab = labelings[best]
            pairs = [adjusted_rand_index(labelings[p], labelings[q])
                     for p in range(runs) for q in range(p + 1, runs)]
            ch, db = ch_db(x, lab)
            row = dict(silhouette=cosine_silhouette(x, lab), stability=float(np.mean(pairs)),
                       stability_min=float(np.min(pairs)),
                       smallest=float(torch.bincount(lab, minlength=k).min()) / n, ch=ch, db=db)
        row["distortion"] = distortion(x, lab, k)
        logs = []
        for ref in refs:
            if k == 1:
                rl = torch.zeros(n, dtype=torch.long)
            else:
                rl = assign(ref, spherical_kmeans(ref, k, seed=seed, config=REF_KMEANS))
            logs.append(math.log(distortion(ref, rl, k)))
        logs = np.array(logs)
        row["gap"] = float(logs.mean() - math.log(row["distortion"])) if refs else math.nan
        row["gap_se"] = float(logs.std() * math.sqrt(1 + 1 / len(logs))) if refs else math.nan
        out[k] = row
    return out


# ------------------------------------------------------------------------------ rules
def _rows(stats, ks):
    return [KScore(k, stats[k]["silhouette"], stats[k]["stability"], stats[k]["stability_min"],
                   stats[k]["smallest"], stats[k]["ch"]) for k in ks]


def rule_previous(stats, ks):
    """the rule before this benchmark (choose_k at 8a65d31): highest silhouette among the K
    whose stability is within 0.1 of the most stable K; None ("no clear K") when that K is
    the largest scored or the silhouettes of all K lie within 0.02"""
    ks = [k for k in ks if k >= 2]
    top = max(stats[k]["stability"] for k in ks)
    k = min((k for k in ks if stats[k]["stability"] >= top - 0.1),
            key=lambda k: (-stats[k]["silhouette"], k))
    sil = [stats[j]["silhouette"] for j in ks]
    return None if k == ks[-1] or max(sil) - min(sil) < FLAT_SILHOUETTE else k


def rule_package(stats, ks):
    """choose_k as it is now: KScores.best (highest CH), None when KScores.unclear says so"""
    rows = tuple(_rows(stats, [k for k in ks if k >= 2]))
    scores = KScores(rows, best_k(rows), 0, 3, BEST_RULE)
    return None if scores.unclear else scores.best


def rule_distortion_ratio(stats, ks):
    """the K after the largest relative drop of the distortion, W(K-1) / W(K), K >= 2"""
    ks = [k for k in ks if k >= 2 and k - 1 in stats]
    return max(ks, key=lambda k: stats[k - 1]["distortion"] / stats[k]["distortion"])


def rule_silhouette_max(stats, ks):
    ks = [k for k in ks if k >= 2]
    return max(ks, key=lambda k: (stats[k]["silhouette"], -k))


def make_sil_near_max(delta):
    def rule(stats, ks):
        ks = [k for k in ks if k >= 2]
        top = max(stats[k]["silhouette"] for k in ks)
        return min(k for k in ks if stats[k]["silhouette"] >= top - delta)
    rule.__doc__ = f"smallest K whose silhouette is within {delta} of the highest"
    return rule


def make_sil_gain(frac):
    def rule(stats, ks):
        ks = [k for k in ks if k >= 2]
        gains = {k: stats[k]["silhouette"] - stats[p]["silhouette"] for p, k in zip(ks, ks[1:])}
        top = max(gains.values())
        if top <= 0:
            return ks[0]
        for k in ks[1:]:
            if gains[k] < frac * top:
                return k - 1 if k - 1 in stats else ks[0]
        return ks[-1]
    rule.__doc__ = (f"the K before the first whose silhouette gain over K-1 falls below "
                    f"{frac} of the best gain")
    return rule


def kneedle(xs, ys):
    """Kneedle (Satopaa et al. 2011) on a decreasing convex curve: the x of the largest
    distance below the chord, and that distance (both axes scaled to [0, 1])."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    xn = (xs - xs[0]) / (xs[-1] - xs[0])
    yn = (ys - ys.min()) / max(ys.max() - ys.min(), 1e-12)
    diff = (1 - xn) - yn          # chord from (0, 1) to (1, 0) minus the curve
    i = int(np.argmax(diff))
    return int(xs[i]), float(diff[i])


def make_kneedle(start, min_strength=0.0):
    def rule(stats, ks):
        ks = [k for k in ks if k >= start]
        k, strength = kneedle(ks, [stats[k]["distortion"] for k in ks])
        return k if strength >= min_strength else None
    rule.__doc__ = (f"Kneedle knee of the distortion curve K = {start}..max"
                    + (f", no clear K under a knee of {min_strength}" if min_strength else ""))
    return rule


def rule_ch_max(stats, ks):
    ks = [k for k in ks if k >= 2]
    return max(ks, key=lambda k: stats[k]["ch"])


def rule_db_min(stats, ks):
    ks = [k for k in ks if k >= 2]
    return min(ks, key=lambda k: stats[k]["db"])


def rule_gap_tibshirani(stats, ks):
    """smallest K with gap(K) >= gap(K+1) - s(K+1) (1 = no structure: no clear K)"""
    for k, nxt in zip(ks, ks[1:]):
        if stats[k]["gap"] >= stats[nxt]["gap"] - stats[nxt]["gap_se"]:
            return k if k >= 2 else None
    return ks[-1]


def rule_gap_max(stats, ks):
    k = max(ks, key=lambda k: stats[k]["gap"])
    return k if k >= 2 else None


def make_stable_largest(threshold):
    def rule(stats, ks):
        ks = [k for k in ks if k >= 2]
        ok = [k for k in ks if stats[k]["stability"] >= threshold]
        return max(ok) if ok else None
    rule.__doc__ = f"largest K whose stability is at least {threshold}"
    return rule


def make_constant(k):
    def rule(stats, ks):
        return k
    rule.__doc__ = f"always K = {k} (a baseline: what the +-1 test lets through)"
    return rule


RULES = {
    "baseline: always K = 2": make_constant(2),
    "baseline: always K = 3": make_constant(3),
    "previous rule (stable K, max silhouette; its no-clear-K checks)": rule_previous,
    "choose_k now (max CH; KScores.unclear)": rule_package,
    "max silhouette": rule_silhouette_max,
    "smallest K with silhouette >= max - 0.02": make_sil_near_max(0.02),
    "smallest K with silhouette >= max - 0.05": make_sil_near_max(0.05),
    "silhouette gain < 0.25 x best gain": make_sil_gain(0.25),
    "silhouette gain < 0.5 x best gain": make_sil_gain(0.5),
    "Kneedle on distortion, K = 1..12": make_kneedle(1),
    "Kneedle on distortion, K = 2..12": make_kneedle(2),
    "max Calinski-Harabasz": rule_ch_max,
    "largest relative distortion drop": rule_distortion_ratio,
    "min Davies-Bouldin": rule_db_min,
    "gap statistic (Tibshirani 1-s.e.)": rule_gap_tibshirani,
    "gap statistic (max)": rule_gap_max,
    "largest K with stability >= 0.9": make_stable_largest(0.9),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path,
                        help="the dataset folder(s), for meta.json's num_classes")
    parser.add_argument("--codes", required=True, type=Path,
                        help="DIR/<dataset>.pt written by suggest_k.py --save-codes")
    parser.add_argument("--k-max", type=int, default=12)
    parser.add_argument("--refs", type=int, default=5, help="gap statistic reference sets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = list(range(1, args.k_max + 1))
    t0 = time.perf_counter()
    datasets = {}
    for root in dataset_dirs(args.data):
        path = args.codes / f"{root.name}.pt"
        if not path.exists():
            continue
        codes = torch.load(path)["codes"]
        true_k = int(json.loads((root / "meta.json").read_text())["num_classes"])
        stats = statistics(codes, ks, seed=args.seed, n_refs=args.refs)
        datasets[root.name] = dict(labelled_k=true_k, stats={
            k: {n: round(v, 4) for n, v in row.items()} for k, row in stats.items()})
        datasets[root.name]["_stats"] = stats
    rules = {}
    for name, rule in RULES.items():
        picks = {d: rule(v["_stats"], ks) for d, v in datasets.items()}
        within = sum(p is not None and abs(p - datasets[d]["labelled_k"]) <= 1
                     for d, p in picks.items())
        rules[name] = dict(picks=picks, within_1=within,
                           no_clear_k=sum(p is None for p in picks.values()))
    for v in datasets.values():
        del v["_stats"]
    print(json.dumps(dict(k_max=args.k_max, refs=args.refs, seed=args.seed,
                          labelled={d: v["labelled_k"] for d, v in datasets.items()},
                          rules=rules, datasets=datasets,
                          seconds=round(time.perf_counter() - t0, 1))))


if __name__ == "__main__":
    main()
