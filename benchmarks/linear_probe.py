"""The ceiling of what the frozen backbone holds: a supervised linear probe on its features.

Usage:
    python benchmarks/linear_probe.py --data ../shared/data --threads 2 > probe.json
    python benchmarks/quality.py --data ../shared/data --probe probe.json   # as a fraction

For each dataset (the same subsets as ``benchmarks/quality.py``): the images are split in
two halves (seeded); a linear softmax classifier is trained on the backbone features of the
first half's cells (each cell labelled with the majority of its pixels' classes, ignore
pixels left out, cells without a valid pixel dropped) and scored on the second half, its
logits up-sampled to the pixels as STEGO's scores are (guided by the pixels' colours,
:func:`napari_stego.predict.guided_scores` with the default ``PredictConfig.guide``; the
result ``probe``), and bilinearly as they were before the guided up-sampling became the
default (``probe_bilinear``). mIoU and accuracy (%) with the true class ids (no matching).
Datasets whose label ids are regions, not classes (``--per-image``, e.g. the Outex mosaics),
have nothing a probe could learn across images and are skipped. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from quality import dataset_dirs, open_dataset

from napari_stego.appearance import work_rgb
from napari_stego.backbones import create_backbone
from napari_stego.features import FeatureConfig, extract_features, work_size
from napari_stego.intensity import to_rgb
from napari_stego.metrics import confusion_matrix
from napari_stego.predict import PredictConfig, guided_scores, upsample_code


def cell_labels(label: np.ndarray, grid: tuple[int, int], stride: int, work: tuple[int, int],
                n_classes: int) -> np.ndarray:
    """Majority class of every feature cell ``(h, w)`` (-1: no valid pixel)."""
    t = torch.from_numpy(label.astype(np.int64))
    onehot = F.one_hot(torch.where(t < n_classes, t, n_classes), n_classes + 1)[..., :n_classes]
    x = onehot.permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != tuple(work):
        x = F.interpolate(x, size=tuple(work), mode="nearest")
    h, w = grid
    x = F.pad(x, (0, max(w * stride - x.shape[-1], 0), 0, max(h * stride - x.shape[-2], 0)))
    counts = F.avg_pool2d(x[..., : h * stride, : w * stride], stride)[0]
    out = counts.argmax(0)
    out[counts.sum(0) <= 0] = -1
    return out.numpy()


def train_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int = 200,
                weight_decay: float = 1e-4, seed: int = 0) -> torch.nn.Linear:
    """Softmax regression on standardised features, full-batch L-BFGS."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def upsampled_logits(logits: torch.Tensor, image: np.ndarray, stride: int, config: FeatureConfig,
                     guided: bool) -> torch.Tensor:
    """Cell logits ``(K, h, w)`` -> ``(K, H, W)`` at the image's pixels, guided by its colours
    (:func:`napari_stego.predict.guided_scores`, as STEGO's scores are brought to the
    pixels) or bilinearly."""
    size, work = image.shape[:2], work_size(image.shape[:2], config.min_side)
    if not guided:
        return upsample_code(logits[None], stride, work, size)[0]
    rgb = work_rgb(to_rgb(image, config.intensity), work)
    return guided_scores(logits[None], rgb, size, stride, PredictConfig().guide)[0]


def scores(conf: np.ndarray) -> dict:
    """mIoU and accuracy (%) of a confusion matrix with the true class ids."""
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter[union > 0] / union[union > 0]
    return dict(miou=round(100 * float(iou.mean()), 2),
                accuracy=round(100 * float(inter.sum() / max(conf.sum(), 1)), 2))


def run_dataset(root: Path, args, backbone) -> dict:
    meta, images, labels = open_dataset(root, args.max_images)
    n_classes = int(meta["num_classes"])
    config = FeatureConfig()
    t0 = time.perf_counter()
    maps = [extract_features(backbone, im, config).float() for im in images]
    order = np.random.default_rng(args.seed).permutation(len(images))
    train_ids, test_ids = order[: len(order) // 2], order[len(order) // 2:]
    xs, ys = [], []
    for i in train_ids:
        grid = tuple(maps[i].shape[-2:])
        y = cell_labels(labels[i], grid, backbone.stride,
                        work_size(images[i].shape[:2], config.min_side), n_classes).reshape(-1)
        keep = y >= 0
        xs.append(maps[i].flatten(1).T[torch.from_numpy(keep)])
        ys.append(torch.from_numpy(y[keep]))
    x, y = torch.cat(xs), torch.cat(ys)
    if len(x) > args.max_cells:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
        x, y = x[idx[: args.max_cells]], y[idx[: args.max_cells]]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    probe = train_probe((x - mean) / std, y, n_classes, seed=args.seed)
    conf = {g: np.zeros((n_classes, n_classes), dtype=np.int64) for g in (True, False)}
    with torch.no_grad():
        for i in test_ids:
            m = (maps[i] - mean[:, None, None]) / std[:, None, None]
            logits = torch.einsum("dhw,kd->khw", m, probe.weight) + probe.bias[:, None, None]
            for guided in conf:
                up = upsampled_logits(logits, images[i], backbone.stride, config, guided)
                conf[guided] += confusion_matrix(up.argmax(0).numpy(), labels[i], n_classes,
                                                 n_classes)
    return dict(n_images=len(images), n_train=len(train_ids), n_test=len(test_ids),
                n_cells=len(x), seconds=round(time.perf_counter() - t0, 1),
                probe=scores(conf[True]), probe_bilinear=scores(conf[False]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0, help="the train / test split")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--max-cells", type=int, default=200_000,
                        help="training cells (a seeded subset when there are more)")
    parser.add_argument("--per-image", nargs="*", default=["outex_texture_mosaics"],
                        help="datasets whose labels are regions (skipped)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = create_backbone(args.backbone)
    result = dict(backbone=args.backbone, seed=args.seed, datasets={})
    for root in dataset_dirs(args.data):
        if root.name in args.per_image:
            continue
        result["datasets"][root.name] = run_dataset(root, args, backbone)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
