"""Segmentation quality on labelled datasets: STEGO (with and without the CRF) against
k-means on the raw backbone features and k-means on the raw pixel colour, each baseline also
with the same CRF (same function, same parameters) as STEGO + CRF.

Usage:
    python benchmarks/quality.py --data ../shared/data                 # every dataset in it
    python benchmarks/quality.py --data ../shared/data/isbi2012_em_membrane --seeds 0

``--data`` is one dataset folder (``images/*.png``, ``labels/*.png`` with the same names,
``meta.json`` with ``num_classes``) or a folder of them. The methods never read the labels:
they only score the result, with Hungarian matching of clusters to classes over the whole
dataset (per image for the datasets named by ``--per-image``, whose label ids are regions,
not classes). K = the number of classes. Each method runs once per seed (the images stay the
same; a seed changes k-means, the training windows and the head's dropout); the mean and the
standard deviation over seeds are reported. Prints one JSON object, and with ``--markdown``
writes the summary table too.

Every method uses the same settings on every dataset: the package defaults (``--steps``
defaults to the package's 500). The margin is STEGO + CRF minus the best of the four
baselines. The baselines' CRF gets probabilities built as STEGO's are: for raw-feature k-means
``softmax(alpha * cos(feature, centroid))`` with the model's ``alpha``; for colour k-means,
whose clusters are Euclidean, ``softmax(-d^2 / (2 s^2))`` with ``s`` the root mean squared
distance of the pixels to their centres. ``--probe FILE`` (from ``benchmarks/linear_probe.py``)
adds each result as a fraction of the supervised linear probe.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from skimage.io import imread

from napari_stego import StegoModel
from napari_stego.appearance import AppearanceConfig, work_rgb
from napari_stego.backbones import create_backbone, upsampled
from napari_stego.choose_k import suggest_for_model
from napari_stego.cluster import ClusterConfig, spherical_kmeans
from napari_stego.crf import default_backend, dense_crf
from napari_stego.features import FeatureConfig, extract_features, work_size
from napari_stego.intensity import to_rgb
from napari_stego.io import to_uint8_rgb
from napari_stego.metrics import confusion_matrix, hungarian_scores
from napari_stego.predict import PredictConfig, guided_probabilities
from napari_stego.train import TrainConfig

METHODS = ("colour_kmeans", "colour_kmeans_crf", "features_kmeans", "features_kmeans_crf",
           "stego", "stego_crf")
BASELINES = METHODS[:4]
TITLES = dict(colour_kmeans="k-means on colour", colour_kmeans_crf="colour k-means + CRF",
              features_kmeans="k-means on raw features",
              features_kmeans_crf="raw-feature k-means + CRF", stego="STEGO",
              stego_crf="STEGO + CRF")
# subsets meant to keep a full run of the six datasets under 40 minutes on 2 idle cores
# (run 5, four datasets: 25 min; run 6 ran on a shared machine, docs/benchmarks.md)
DEFAULT_MAX_IMAGES = dict(camvid11=60, wbc_jiangxi_tecom=100, outex_texture_mosaics=30,
                          wbc_cellavision=60, fluo_nuclei_coelho2009=10)


def dataset_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is a dataset, else its sub-folders that are."""
    if (root / "meta.json").exists():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / "meta.json").exists())
    if not found:
        raise SystemExit(f"no dataset (a folder with meta.json) in {root}")
    return found


def subset_names(root: Path, max_images: int | None, seed: int = 0) -> list[str]:
    """File names of ``root``'s images: all, or a seeded random subset of ``max_images``."""
    names = sorted(p.name for p in (root / "images").glob("*.png"))
    if max_images and len(names) > max_images:
        names = sorted(np.random.default_rng(seed).choice(names, max_images, replace=False))
    return names


def load_dataset(root: Path, max_images: int | None, seed: int = 0):
    """Images and label maps of ``root`` (a seeded random subset of ``max_images``)."""
    names = subset_names(root, max_images, seed)
    return ([imread(root / "images" / n) for n in names],
            [imread(root / "labels" / n) for n in names])


def open_dataset(root: Path, max_images: int | None, defaults: dict = DEFAULT_MAX_IMAGES):
    """``(meta, images, labels)`` of ``root``: ``max_images`` of them, or the subset
    ``defaults`` names for it (all when it names none)."""
    meta = json.loads((root / "meta.json").read_text())
    images, labels = load_dataset(root, max_images if max_images is not None
                                  else defaults.get(root.name))
    return meta, images, labels


def score(preds, labels, n_clusters: int, n_classes: int, per_image: bool) -> dict:
    """Hungarian-matched mIoU and accuracy (%) over the dataset, or the mean over images."""
    confs = [confusion_matrix(p, t, n_clusters, n_classes) for p, t in zip(preds, labels)]
    if per_image:
        runs = [hungarian_scores(c) for c in confs]
        return dict(miou=float(np.mean([r["miou"] for r in runs])),
                    accuracy=float(np.mean([r["accuracy"] for r in runs])))
    s = hungarian_scores(sum(confs))
    return dict(miou=float(s["miou"]), accuracy=float(s["accuracy"]))


def colour_kmeans(images, n_clusters: int, seed: int, max_points: int = 200_000,
                  n_init: int = 10, proba: bool = False) -> list:
    """Euclidean k-means on the 0-255 RGB values of all pixels: ``n_init`` k-means++ runs on
    a sample, the one with the lowest inertia kept (a single run lands in other local optima
    from seed to seed: on the blood cells 39 or 77 mIoU, the 39 one with the lower inertia).

    Returns label maps, or with ``proba`` ``(K, H, W)`` probabilities
    ``softmax(-d^2 / (2 s^2))`` (``s^2``: the sample's mean squared distance to its centre
    over all channels), for the CRF."""
    pixels = [to_uint8_rgb(im).reshape(-1, 3).astype(np.float32) for im in images]
    every = np.concatenate(pixels)
    rng = np.random.default_rng(seed)
    sample = every[rng.choice(len(every), min(len(every), max_points), replace=False)]
    best = None
    for run in range(n_init):
        centres, assigned = kmeans2(sample, n_clusters, minit="++", seed=seed * n_init + run)
        inertia = float(((sample - centres[assigned]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres)
    centres = best[1]
    if not proba:
        return [((p[:, None] - centres[None]) ** 2).sum(-1).argmin(1).reshape(im.shape[:2])
                for im, p in zip(images, pixels)]
    var = max(best[0] / len(sample), 1e-6)  # mean squared distance to the centres
    out = []
    for im, p in zip(images, pixels):
        logits = -((p[:, None] - centres[None]) ** 2).sum(-1) / (2 * var)
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy().astype(np.float32)
        out.append(probs.T.reshape(n_clusters, *im.shape[:2]))
    return out


@torch.inference_mode()
def features_kmeans(maps, images, n_clusters: int, seed: int, stride: int,
                    config: FeatureConfig, alpha: float | None = None) -> list:
    """Spherical k-means on the backbone features, up-sampled to the image like codes.

    The cosines of each feature cell to the centroids are brought to the pixels as STEGO's
    scores are (:func:`~napari_stego.predict.guided_probabilities` with the package's default
    ``PredictConfig``, guided by the image's colours), so the baseline and STEGO differ only
    in what is clustered. Returns the labels ``(H, W)``, or with ``alpha`` the probabilities
    ``(K, H, W)`` ``softmax(alpha * score)`` (for the CRF).
    """
    centroids = spherical_kmeans(torch.cat([m.flatten(1).T for m in maps]), n_clusters, seed=seed)
    predict = replace(PredictConfig(), alpha=alpha or PredictConfig().alpha)
    preds = []
    for im, m in zip(images, maps):
        rgb = work_rgb(to_rgb(im, config.intensity), work_size(im.shape[:2], config.min_side))
        p = guided_probabilities(m[None].float(), rgb, im.shape[:2], stride, predict,
                                 lambda _colours: (centroids, None))[0]
        preds.append(p.argmax(0).numpy() if alpha is None else p.numpy().astype(np.float32))
    return preds


def run_dataset(root: Path, args, backbone) -> dict:
    meta, images, labels = open_dataset(root, args.max_images)
    n_classes = int(meta["num_classes"])
    per_image = root.name in args.per_image
    out = dict(n_images=len(images), of=int(meta.get("num_images", len(images))),
               n_clusters=n_classes, per_image=per_image, runs={m: [] for m in METHODS},
               seconds={m: 0.0 for m in METHODS})
    config = FeatureConfig(upsample=args.upsample)
    backbone = upsampled(backbone, args.upsample)
    t0 = time.perf_counter()
    maps = [extract_features(backbone, im, config).float() for im in images]
    features_s = time.perf_counter() - t0

    def record(method, preds, seconds):
        out["runs"][method].append(score(preds, labels, n_classes, n_classes, per_image))
        out["seconds"][method] += seconds

    alpha = PredictConfig().alpha
    with tempfile.TemporaryDirectory() as cache:
        for seed in args.seeds:
            t0 = time.perf_counter()
            probs = colour_kmeans(images, n_classes, seed, proba=True)
            record("colour_kmeans", [p.argmax(0) for p in probs], time.perf_counter() - t0)
            record("colour_kmeans_crf", [dense_crf(im, p).argmax(0) for im, p in zip(images, probs)],
                   time.perf_counter() - t0)
            t0 = time.perf_counter()
            probs = features_kmeans(maps, images, n_classes, seed, backbone.stride, config, alpha)
            share = features_s / len(args.seeds)
            record("features_kmeans", [p.argmax(0) for p in probs], time.perf_counter() - t0 + share)
            record("features_kmeans_crf",
                   [dense_crf(im, p).argmax(0) for im, p in zip(images, probs)],
                   time.perf_counter() - t0 + share)
            del probs

            # the images go in as arrays with a feature cache: refits with other seeds find
            # their features there, as when a user refits the same data
            t0 = time.perf_counter()
            train = TrainConfig(steps=args.steps)
            if args.appearance != "default":
                weight = None if args.appearance == "auto" else float(args.appearance)
                extra = {} if args.max_weight is None else dict(max_weight=args.max_weight)
                train = replace(train, appearance=AppearanceConfig(weight=weight, **extra))
            if args.ema_span != "default":
                train = replace(train, ema_span=None if args.ema_span == "off"
                                else float(args.ema_span))
            cluster = ClusterConfig() if args.refine == "default" else \
                ClusterConfig(refine=args.refine == "on")
            model = StegoModel.fit(images, n_classes, backbone=backbone, features=config,
                                   train=train, cluster=cluster, seed=seed, cache=cache)
            # from the features computed above, not per seed (the backbone runs twice per
            # dataset: for these maps, and into the fit's cache on the first seed)
            probs = [model.proba_from_features(m, im.shape[:2], im) for m, im in zip(maps, images)]
            fit_s = time.perf_counter() - t0 + features_s / len(args.seeds)  # + its share of the backbone
            record("stego", [p.argmax(0) for p in probs], fit_s)
            t0 = time.perf_counter()
            refined = [dense_crf(im, p).argmax(0) for im, p in zip(images, probs)]
            record("stego_crf", refined, fit_s + time.perf_counter() - t0)
            if seed == args.seeds[0] and args.suggest_k:
                t0 = time.perf_counter()
                ks = suggest_for_model(model, images, range(2, 13), seed=seed)
                out["suggest_k"] = dict(best=ks.best, true_k=n_classes,
                                        seconds=round(time.perf_counter() - t0, 1),
                                        table=ks.to_dict())
            loss = model.train_config.loss
            out.setdefault("shifts", []).append([loss.self_shift, loss.knn_shift, loss.rand_shift])
            # the attracted fractions and the regions' measure they came from
            out.setdefault("shift_rule", []).append(model.info.get("shifts"))
            out.setdefault("appearance", []).append(model.info.get("appearance"))
            out.setdefault("refine", []).append(model.info.get("refine"))
            out.setdefault("ema_span", []).append(model.train_config.ema_span)
            print(f"{root.name} seed {seed}: " + ", ".join(
                f"{m} {out['runs'][m][-1]['miou']:.1f}" for m in METHODS), flush=True)

    for m in METHODS:
        for key in ("miou", "accuracy"):
            values = [r[key] for r in out["runs"][m]]
            out.setdefault("mean", {}).setdefault(m, {})[key] = round(float(np.mean(values)), 2)
            out.setdefault("std", {}).setdefault(m, {})[key] = round(float(np.std(values)), 2)
        out["seconds"][m] = round(out["seconds"][m] / len(args.seeds), 1)
    best_baseline = max(out["mean"][m]["miou"] for m in BASELINES)
    out["margin"] = round(out["mean"]["stego_crf"]["miou"] - best_baseline, 2)
    probe = args.probe_results.get(root.name)
    if probe:
        out["probe_miou"] = probe
        out["fraction_of_probe"] = round(out["mean"]["stego_crf"]["miou"] / probe, 3)
    return out


def markdown(result: dict) -> str:
    """The summary table: mIoU mean ± std over seeds (accuracy in brackets) per method."""
    head = "| dataset | images | K | " + " | ".join(TITLES[m] for m in METHODS) + \
        " | STEGO + CRF minus the best baseline |"
    rows, notes = [head, "|" + "---|" * (len(METHODS) + 4)], []
    for name, d in result["datasets"].items():
        cells = [f"{d['mean'][m]['miou']:.1f} ± {d['std'][m]['miou']:.1f} "
                 f"({d['mean'][m]['accuracy']:.1f})" for m in METHODS]
        n = f"{d['n_images']}" + (f" of {d['of']}" if d["of"] != d["n_images"] else "")
        name = name + (" (per-image matching)" if d["per_image"] else "")
        rows.append(f"| {name} | {n} | {d['n_clusters']} | " + " | ".join(cells) +
                    f" | {d['margin']:+.1f} |")
        if "fraction_of_probe" in d:
            notes.append(f"{name}: STEGO + CRF = {100 * d['fraction_of_probe']:.0f} % of the "
                         f"linear probe's {d['probe_miou']:.1f} mIoU")
        if "suggest_k" in d:
            notes.append(f"{name}: suggest_n_clusters picks K = {d['suggest_k']['best']} "
                         f"(true {d['n_clusters']})")
    rows.append("| **mean margin** | | | " + "| " * len(METHODS) +
                f"**{result['mean_margin']:+.1f}** |")
    return "\n".join(rows + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path,
                        help="a dataset folder or a folder of dataset folders")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps,
                        help="training steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--upsample", type=int, default=1,
                        help="FeatureConfig.upsample for every method that uses features")
    parser.add_argument("--max-images", type=int, default=None,
                        help="random subset of this many images per dataset (default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_IMAGES.items())
                             + ", all of the others)")
    parser.add_argument("--per-image", nargs="*", default=["outex_texture_mosaics"],
                        help="datasets scored with per-image matching")
    parser.add_argument("--suggest-k", action="store_true",
                        help="also score K = 2..12 on the first seed's model (suggest_for_model)")
    parser.add_argument("--max-weight", type=float, default=None,
                        help="AppearanceConfig.max_weight of the rule (with --appearance auto)")
    parser.add_argument("--appearance", default="default",
                        help="AppearanceConfig.weight of the fits: 'default' (the package's: "
                             "the gated rule since run 8), 'auto' (the rule) or a fixed weight "
                             "in [0, 1]")
    parser.add_argument("--refine", choices=("default", "on", "off"), default="default",
                        help="ClusterConfig.refine of the fits (the principal-mask refinement "
                             "of the centroids): the package's default, or on / off")
    parser.add_argument("--ema-span", default="default",
                        help="TrainConfig.ema_span of the fits (the head kept is the moving "
                             "average of its weights, with a time constant of this fraction "
                             "of the steps): 'default' (the package's), 'off' or a fraction")
    parser.add_argument("--probe", type=Path, default=None,
                        help="JSON of benchmarks/linear_probe.py: report results as a fraction "
                             "of the probe's mIoU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", type=Path, help="also write the summary table here")
    args = parser.parse_args()
    args.probe_results = {}
    if args.probe:
        probe = json.loads(args.probe.read_text())
        args.probe_results = {k: v["probe"]["miou"] for k, v in probe["datasets"].items()}
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = create_backbone(args.backbone)
    result = dict(backbone=args.backbone, upsample=args.upsample, steps=args.steps,
                  seeds=args.seeds,
                  crf_backend=default_backend(), torch_threads=torch.get_num_threads(),
                  datasets={})
    t0 = time.perf_counter()
    for root in dataset_dirs(args.data):
        result["datasets"][root.name] = run_dataset(root, args, backbone)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["mean_margin"] = round(float(np.mean(
        [d["margin"] for d in result["datasets"].values()])), 2)
    print(json.dumps(result))
    if args.markdown:
        args.markdown.write_text(markdown(result) + "\n")


if __name__ == "__main__":
    main()
