"""The principal-mask refinement of the centroids, paired: the same heads with and without it.

Usage:
    python benchmarks/refine.py --data ../shared/data --seeds 0 1 2 --models /tmp/heads

For every dataset of ``--data`` (the subsets of ``benchmarks/quality.py``) and seed, a head is
fitted with the package defaults but ``ClusterConfig(refine=False)`` (or loaded from
``--models`` when a previous run saved it there), then scored twice: with its k-means
centroids, and with the centroids :func:`napari_stego.refine.refine_for_head` makes of them on
the same training maps :meth:`StegoModel.fit` uses (``training_maps``). Both are scored as
``quality.py`` scores STEGO and STEGO + CRF (Hungarian mIoU %, per image for the Outex
mosaics). The pairing removes the seed-to-seed spread of training from the comparison: only
the centroids differ. Prints one JSON object; ``--markdown`` also writes the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_stego import StegoModel
from napari_stego.backbones import create_backbone
from napari_stego.cluster import ClusterConfig
from napari_stego.crf import dense_crf
from napari_stego.features import FeatureConfig, extract_features
from napari_stego.predict import PredictConfig
from napari_stego.refine import refine_for_head
from napari_stego.train_crops import training_maps

from quality import dataset_dirs, open_dataset, score  # benchmarks/ is on sys.path when run


def _scores(model, maps, images, labels, k, per_image) -> dict:
    probs = [model.proba_from_features(m, im.shape[:2], im) for m, im in zip(maps, images)]
    plain = score([p.argmax(0) for p in probs], labels, k, k, per_image)["miou"]
    crf = score([dense_crf(im, p).argmax(0) for im, p in zip(images, probs)],
                labels, k, k, per_image)["miou"]
    return dict(stego=round(plain, 2), stego_crf=round(crf, 2))


def run_dataset(root: Path, args, net) -> dict:
    meta, images, labels = open_dataset(root, None)
    k = int(meta["num_classes"])
    per_image = root.name in args.per_image
    with torch.inference_mode():
        maps = [extract_features(net, im, FeatureConfig()).float() for im in images]
    out = dict(n_images=len(images), runs=[])
    for seed in args.seeds:
        path = args.models / f"{root.name}_s{seed}.stego"
        t0 = time.perf_counter()
        if path.exists():
            model = StegoModel.load(path)
        else:
            model = StegoModel.fit(images, k, backbone=net, seed=seed,
                                   cluster=ClusterConfig(refine=False, colour=False),
                                   cache=args.models / "cache" / root.name)
            model.save(path)
        fit_s = time.perf_counter() - t0
        before = _scores(model, maps, images, labels, k, per_image)
        window = max(224 // net.stride, 1)
        t0 = time.perf_counter()
        centroids, report = refine_for_head(
            model.head, training_maps(maps, window, model.tile_config, seed=seed),
            model.centroids, device=model.device, seed=seed,
            max_maps=ClusterConfig().refine_maps, alpha=PredictConfig().alpha)
        refine_s = time.perf_counter() - t0
        model.centroids = centroids
        after = _scores(model, maps, images, labels, k, per_image)
        run = dict(seed=seed, before=before, after=after, report=report,
                   fit_s=round(fit_s, 1), refine_s=round(refine_s, 2))
        out["runs"].append(run)
        print(root.name, json.dumps(run), flush=True)
    for key in ("stego", "stego_crf"):
        for when in ("before", "after"):
            out.setdefault(when, {})[key] = round(float(np.mean(
                [r[when][key] for r in out["runs"]])), 2)
    return out


def markdown(result: dict) -> str:
    rows = ["| dataset | STEGO before / after | STEGO + CRF before / after | change (+ CRF) | per seed (+ CRF, before -> after) |",
            "|---|---|---|---|---|"]
    changes = []
    for name, r in result.items():
        b, a = r["before"], r["after"]
        change = a["stego_crf"] - b["stego_crf"]
        changes.append(change)
        seeds = ", ".join(f"{x['before']['stego_crf']:.1f} -> {x['after']['stego_crf']:.1f}"
                          for x in r["runs"])
        rows.append(f"| {name} ({r['n_images']}) | {b['stego']:.1f} / {a['stego']:.1f} | "
                    f"{b['stego_crf']:.1f} / {a['stego_crf']:.1f} | {change:+.1f} | {seeds} |")
    rows.append(f"| **mean** | | | **{np.mean(changes):+.1f}** | |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", type=Path, required=True,
                        help="folder for the fitted heads (reused when present)")
    parser.add_argument("--per-image", nargs="*", default=["outex_texture_mosaics"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.models.mkdir(parents=True, exist_ok=True)
    net = create_backbone("efficientnet_lite0")
    result = {root.name: run_dataset(root, args, net) for root in dataset_dirs(args.data)}
    print(json.dumps(result))
    if args.markdown:
        args.markdown.write_text(markdown(result))


if __name__ == "__main__":
    main()
