"""Segmentation quality on a labelled dataset: STEGO vs k-means on the raw backbone features.

Usage:
    python benchmarks/quality.py --data ../shared/data/isbi2012_em_membrane --n-clusters 2

DIR holds ``images/*.png`` and ``labels/*.png`` (same names; class ids, 255 = ignore). The
method never reads the labels; they only score the result (Hungarian matching over the whole
dataset, or per image with ``--per-image``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from skimage.io import imread

from napari_stego import StegoModel
from napari_stego.backbones import create_backbone
from napari_stego.cluster import spherical_kmeans
from napari_stego.features import FeatureConfig, extract_features
from napari_stego.loss import LossConfig
from napari_stego.metrics import confusion_matrix, hungarian_scores
from napari_stego.model import _work_size
from napari_stego.shifts import AutoShiftConfig
from napari_stego.predict import cluster_probabilities, upsample_code
from napari_stego.train import TrainConfig


def load_dataset(root: Path, max_images: int | None, seed: int):
    names = sorted(p.name for p in (root / "images").glob("*.png"))
    if max_images and len(names) > max_images:
        rng = np.random.default_rng(seed)
        names = sorted(rng.choice(names, max_images, replace=False))
    images = [imread(root / "images" / n) for n in names]
    labels = [imread(root / "labels" / n) for n in names]
    return images, labels


def score(preds, labels, n_clusters: int, n_classes: int, per_image: bool) -> dict:
    confs = [confusion_matrix(p, t, n_clusters, n_classes) for p, t in zip(preds, labels)]
    if per_image:
        runs = [hungarian_scores(c) for c in confs]
        return dict(miou=float(np.mean([r["miou"] for r in runs])),
                    accuracy=float(np.mean([r["accuracy"] for r in runs])))
    s = hungarian_scores(sum(confs))
    return dict(miou=s["miou"], accuracy=s["accuracy"],
                iou_per_class=[round(float(v), 2) for v in s["iou_per_class"]])


@torch.inference_mode()
def raw_feature_kmeans(backbone, images, n_clusters: int, seed: int, config: FeatureConfig):
    """The baseline: spherical k-means on the backbone features, upsampled like codes."""
    maps = [extract_features(backbone, im, config).float() for im in images]
    centroids = spherical_kmeans(torch.cat([m.flatten(1).T for m in maps]), n_clusters, seed=seed)
    preds = []
    for im, m in zip(images, maps):
        work = _work_size(im.shape[:2], config.min_side)
        up = upsample_code(m[None], backbone.stride, work, im.shape[:2])
        preds.append(cluster_probabilities(up, centroids).argmax(1)[0].numpy())
    return preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--n-clusters", type=int, required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--shifts", type=float, nargs=3, metavar=("SELF", "KNN", "RAND"),
                        help="fixed loss shifts (default: chosen from the data, shifts='auto')")
    parser.add_argument("--attract", type=float, nargs=3, metavar=("SELF", "KNN", "RAND"),
                        help="fractions of attracted pairs for the automatic shifts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, help="random subset of this many images")
    parser.add_argument("--per-image", action="store_true", help="Hungarian matching per image")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    meta = json.loads((args.data / "meta.json").read_text())
    n_classes = int(meta["num_classes"])
    images, labels = load_dataset(args.data, args.max_images, args.seed)
    backbone = create_backbone(args.backbone)
    result = dict(dataset=args.data.name, n_images=len(images), n_clusters=args.n_clusters,
                  backbone=args.backbone, steps=args.steps, seed=args.seed)

    t0 = time.perf_counter()
    base = raw_feature_kmeans(backbone, images, args.n_clusters, args.seed, FeatureConfig())
    result["raw_features_kmeans"] = score(base, labels, args.n_clusters, n_classes, args.per_image)
    result["raw_features_kmeans"]["seconds"] = round(time.perf_counter() - t0, 1)

    train = TrainConfig(steps=args.steps, batch_size=args.batch_size)
    if args.shifts:
        loss = LossConfig(self_shift=args.shifts[0], knn_shift=args.shifts[1], rand_shift=args.shifts[2])
        train = replace(train, loss=loss, auto_shifts=None)
    elif args.attract:
        train = replace(train, auto_shifts=AutoShiftConfig(*args.attract))
    t0 = time.perf_counter()
    model = StegoModel.fit(images, args.n_clusters, backbone=backbone, train=train,
                           device=args.device, seed=args.seed)
    preds = [model.predict(im) for im in images]
    result["stego"] = score(preds, labels, args.n_clusters, n_classes, args.per_image)
    result["stego"]["seconds"] = round(time.perf_counter() - t0, 1)
    used = model.train_config.loss
    result["stego"]["shifts"] = [used.self_shift, used.knn_shift, used.rand_shift]
    result["stego"]["auto_shifts"] = (asdict(model.train_config.auto_shifts)
                                      if model.train_config.auto_shifts else None)
    result["stego"]["final_loss"] = model.info.get("final_loss")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
