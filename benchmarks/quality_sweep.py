"""Diagnostics for one labelled dataset: how STEGO (+ CRF) responds to training settings, the
softmax temperature and CRF parameters, with the backbone run once.

Usage:
    python benchmarks/quality_sweep.py --data ../shared/data/wbc_jiangxi_tecom --steps 500
    python benchmarks/quality_sweep.py --data ../shared/data/outex_texture_mosaics \\
        --alphas 2 1 4 --crf '{}' '{"pos_xy_std": 3}' --baselines

Same subsets, scoring and baselines as ``benchmarks/quality.py``; prints one JSON line per
seed (mIoU %). For exploring settings; the numbers that count come from ``quality.py``.

``--grid`` runs several training settings on the same features, e.g.
``--grid '{"attract": [0.15, 0.3, 0.45]}' '{"attract": [0.3, 0.3, 0.3], "steps": 800}'``
(keys: ``attract``, ``steps``, ``lr``, ``code_dim``, ``batch_size``; unset ones come from the
flags). ``--device cuda`` runs the backbone, training and the CRF's torch backend on a GPU
(bf16 features, so the numbers differ a little from the CPU's).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from quality import DEFAULT_MAX_IMAGES, colour_kmeans, features_kmeans, load_dataset, score

from napari_stego import StegoModel
from napari_stego.backbones import create_backbone
from napari_stego.cluster import ClusterConfig
from napari_stego.crf import dense_crf
from napari_stego.features import FeatureConfig, extract_features
from napari_stego.predict import PredictConfig, cluster_probabilities
from napari_stego.shifts import AutoShiftConfig
from napari_stego.train import TrainConfig


@torch.inference_mode()
def flip_proba(model: StegoModel, feats: torch.Tensor, mirrored: torch.Tensor, size) -> np.ndarray:
    """Probabilities ``(K, H, W)`` from the mean of the image's code and its mirror image's
    code flipped back (both up-sampled to the image first, so padding cannot shift them)."""
    if model.colour_space is not None:
        raise SystemExit("--flip averages codes only: fit with ClusterConfig(colour=False)")
    code = (model.upsampled_code(feats, size) + model.upsampled_code(mirrored, size).flip(-1)) / 2
    probs = cluster_probabilities(code, model.centroids, model.predict_config.alpha)
    return probs[0].cpu().numpy().astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="one dataset folder")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--code-dim", type=int, default=TrainConfig.code_dim)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--attract", type=float, nargs=3, default=None, metavar=("SELF", "KNN", "RAND"),
                   help="AutoShiftConfig attracted fractions, fixed for the data (default: the "
                        "package's, whose self fraction follows the features' regions)")
    p.add_argument("--alphas", type=float, nargs="+", default=[PredictConfig.alpha],
                   help="softmax temperatures for the CRF input (the first one also for STEGO)")
    p.add_argument("--crf", nargs="*", default=["{}"], help="JSON dicts of dense_crf parameters")
    p.add_argument("--baselines", action="store_true", help="also colour and raw-feature k-means")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--per-image", action="store_true", help="per-image matching (Outex)")
    p.add_argument("--flip", action="store_true",
                   help="also score codes averaged with the mirror image's (the reference's evaluation)")
    p.add_argument("--grid", nargs="+", default=None,
                   help="JSON dicts of training settings to run in turn (see above)")
    p.add_argument("--min-side", type=int, default=FeatureConfig.min_side,
                   help="FeatureConfig.min_side: smaller images are up-sampled to it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--crf-backend", default=None, help="dense_crf backend (default: the device's)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    meta = json.loads((args.data / "meta.json").read_text())
    k = int(meta["num_classes"])
    per_image = args.per_image or args.data.name == "outex_texture_mosaics"
    images, labels = load_dataset(args.data, args.max_images or DEFAULT_MAX_IMAGES.get(args.data.name))
    device = torch.device(args.device)
    backbone = create_backbone(args.backbone).to(device)
    config = FeatureConfig(min_side=args.min_side)
    maps = [extract_features(backbone, im, config, device).float() for im in images]
    mirrored = [extract_features(backbone, im[:, ::-1].copy(), config, device).float()
                for im in images] if args.flip else None
    crfs = [json.loads(c) for c in args.crf]
    crf_on = dict(backend=args.crf_backend, device=device)
    plain = dict(attract=args.attract, steps=args.steps, lr=args.lr, code_dim=args.code_dim,
                 batch_size=args.batch_size)
    settings = [dict(plain, **json.loads(g)) for g in args.grid] if args.grid else [plain]

    def miou(preds) -> float:
        return round(score(preds, labels, k, k, per_image)["miou"], 1)

    baselines: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as cache:
        for setting, seed in ((s, seed) for s in settings for seed in args.seeds):
            out: dict = dict(dataset=args.data.name, seed=seed, **setting)
            if args.baselines:  # they depend on the seed only: once per seed, not per setting
                if seed not in baselines:
                    baselines[seed] = dict(
                        colour_kmeans=miou(colour_kmeans(images, k, seed)),
                        features_kmeans=miou(features_kmeans(maps, images, k, seed,
                                                             backbone.stride, config)))
                out.update(baselines[seed])
            t0 = time.perf_counter()
            attract = setting["attract"]
            train = TrainConfig(steps=setting["steps"], lr=setting["lr"],
                                # fixed fractions: the regions' rule off
                                auto_shifts=(AutoShiftConfig(*attract, region_self_attract=None)
                                             if attract else AutoShiftConfig()),
                                code_dim=setting["code_dim"], batch_size=setting["batch_size"])
            model = StegoModel.fit(images, k, backbone=backbone, features=config, train=train,
                                   seed=seed, cluster=ClusterConfig(), cache=cache, device=device)
            out["fit_s"] = round(time.perf_counter() - t0, 1)
            for alpha in args.alphas:
                model.predict_config = PredictConfig(alpha=alpha)
                probs = [model.proba_from_features(m, im.shape[:2], im) for m, im in zip(maps, images)]
                if alpha == args.alphas[0]:
                    out["stego"] = miou([q.argmax(0) for q in probs])
                for c in crfs:
                    out[f"stego_crf alpha={alpha} {json.dumps(c)}"] = miou(
                        [dense_crf(im, q, **c, **crf_on).argmax(0) for im, q in zip(images, probs)])
            if mirrored is not None:
                model.predict_config = PredictConfig(alpha=args.alphas[0])
                probs = [flip_proba(model, m, mm, im.shape[:2])
                         for m, mm, im in zip(maps, mirrored, images)]
                out["stego flip"] = miou([q.argmax(0) for q in probs])
                out["stego_crf flip"] = miou([dense_crf(im, q, **crf_on).argmax(0)
                                              for im, q in zip(images, probs)])
            out["shift_report"] = model.info["shifts"]
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
