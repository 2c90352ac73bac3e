"""Suggest K on labelled datasets: does the label-free rule find the labelled number of classes?

Usage:
    python benchmarks/suggest_k.py --data ../shared/data                  # every dataset in it
    python benchmarks/suggest_k.py --data ../shared/data/wbc_cellavision --max-images 10
    python benchmarks/suggest_k.py --sample immunohistochemistry          # the plugin's sample

``--data`` is one dataset folder (``images/*.png``, ``meta.json`` with ``num_classes``) or a
folder of them. Only the images are read, never the label maps: per dataset a model is fitted
with K = ``num_classes`` (``StegoModel.fit(images, K, backbone=...)``, the package defaults
otherwise) on a seeded subset of the images, then ``suggest_for_model`` scores K = 2..12 on the
same images. ``num_classes`` is only compared with the suggestion afterwards. Prints one JSON
object: per dataset the labelled K, the suggested K (or "no clear K" when
``KScores.unclear`` says so), whether it is within +-1 of the labelled K, and the curves
(Calinski-Harabasz, silhouette and stability per K). ``benchmarks/suggest_k_rules.py``
compares other rules on the same codes.

``--sample immunohistochemistry`` does what a user of the napari panel does with the plugin's
sample image instead (no labels: the expected K is the three classes README.md describes,
glands, stroma and DAB-stained spots): the Fit tab's fit of the layer (``StegoModel.fit`` of
the image as one source with its axes, K = 3, the widget's defaults otherwise), then the
Suggest K tab's ``suggest_for_model`` on the same layer with the tab's defaults (K = 2..12,
10 000 code vectors, 3 runs per K).

The fits take most of the time. ``--save-codes DIR`` writes each dataset's sampled code vectors
to ``DIR/<dataset>.pt`` (keep it in /tmp, never commit it); ``--codes DIR`` then reads them
back instead of fitting and sampling, so a rule is re-scored on the same codes in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from skimage.io import imread

from quality import dataset_dirs, subset_names

from napari_stego import StegoModel
from napari_stego.backbones import create_backbone
from napari_stego.choose_k import ChooseKConfig, sample_model_codes, suggest_n_clusters

# subsets meant to keep the six datasets under ~15 minutes on 2 cores
DEFAULT_MAX_IMAGES = dict(camvid11=24, isbi2012_em_membrane=24, wbc_jiangxi_tecom=30,
                          outex_texture_mosaics=24, wbc_cellavision=24,
                          fluo_nuclei_coelho2009=6)


def load_images(root: Path, max_images: int | None, seed: int = 0) -> list[np.ndarray]:
    """The images of ``root`` (the subset ``benchmarks/quality.py`` picks for the same number
    and seed). Label maps are not read."""
    return [imread(root / "images" / n) for n in subset_names(root, max_images, seed)]


def run_dataset(root: Path, args, backbone) -> dict:
    meta = json.loads((root / "meta.json").read_text())
    true_k = int(meta["num_classes"])
    max_images = args.max_images if args.max_images is not None else \
        DEFAULT_MAX_IMAGES.get(root.name)
    saved = args.codes / f"{root.name}.pt" if args.codes else None
    fit_s = sample_s = 0.0
    if saved is not None:
        blob = torch.load(saved)
        codes, n_images = blob["codes"], blob["n_images"]
    else:
        images = load_images(root, max_images, args.seed)
        n_images = len(images)
        t0 = time.perf_counter()
        model = StegoModel.fit(images, true_k, backbone=backbone, steps=args.steps,
                               seed=args.seed)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        codes = sample_model_codes(model, images, max_points=ChooseKConfig().max_points,
                                   seed=args.seed)
        sample_s = time.perf_counter() - t0
        if args.save_codes:
            args.save_codes.mkdir(parents=True, exist_ok=True)
            torch.save(dict(codes=codes, n_images=n_images),
                       args.save_codes / f"{root.name}.pt")
    t0 = time.perf_counter()
    scores = suggest_n_clusters(codes, range(args.k_min, args.k_max + 1), seed=args.seed,
                                current=true_k)
    suggest_s = time.perf_counter() - t0
    unclear = scores.unclear
    out = dict(n_images=n_images, labelled_k=true_k,
               suggested_k="no clear K" if unclear else scores.best,
               best_of_curve=scores.best,
               within_1=(not unclear) and abs(scores.best - true_k) <= 1,
               unclear=unclear or None,
               curve={r.k: dict(calinski_harabasz=round(r.calinski_harabasz, 1),
                                silhouette=round(r.silhouette, 4),
                                stability=round(r.stability, 4),
                                smallest=round(r.smallest, 4)) for r in scores.rows},
               seconds=dict(fit=round(fit_s, 1), codes=round(sample_s, 1),
                            suggest=round(suggest_s, 1)))
    print(f"{root.name}: labelled K {true_k}, suggested {out['suggested_k']} "
          f"(curve's best {scores.best}), {fit_s:.0f} s fit, {suggest_s:.0f} s suggest",
          flush=True)
    return out


SAMPLES = {"immunohistochemistry": 3}  # sample name -> the classes README.md describes


def run_sample(name: str, args, backbone) -> dict:
    """The panel's Fit tab, then its Suggest K tab, on one of the plugin's sample images."""
    from napari_stego import samples
    from napari_stego.choose_k import suggest_for_model
    from napari_stego.io import open_image

    image = getattr(samples, name)()
    expected = SAMPLES[name]
    t0 = time.perf_counter()
    model = StegoModel.fit([open_image(image, "YXC", name=name)], expected, backbone=backbone,
                           steps=args.steps, seed=args.seed)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = suggest_for_model(model, [image], range(args.k_min, args.k_max + 1),
                               config=ChooseKConfig())
    suggest_s = time.perf_counter() - t0
    unclear = scores.unclear
    out = dict(n_images=1, expected_k=expected, suggested_k="no clear K" if unclear
               else scores.best, best_of_curve=scores.best, unclear=unclear or None,
               within_1=(not unclear) and abs(scores.best - expected) <= 1,
               appearance=model.info.get("appearance"),
               cluster_shares=model.info.get("cluster_shares"),
               curve={r.k: dict(calinski_harabasz=round(r.calinski_harabasz, 1),
                                silhouette=round(r.silhouette, 4),
                                stability=round(r.stability, 4),
                                smallest=round(r.smallest, 4)) for r in scores.rows},
               seconds=dict(fit=round(fit_s, 1), suggest=round(suggest_s, 1)))
    print(f"{name}: expected K {expected}, suggested {out['suggested_k']} "
          f"(curve's best {scores.best}), {fit_s:.0f} s fit, {suggest_s:.0f} s suggest",
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="a dataset folder or a folder of dataset folders")
    source.add_argument("--sample", choices=sorted(SAMPLES),
                        help="one of the plugin's sample images, as the napari panel does")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the package's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the image subset, the fit and the K scoring")
    parser.add_argument("--k-min", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=12)
    parser.add_argument("--max-images", type=int, default=None,
                        help="random subset of this many images per dataset (default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_IMAGES.items())
                             + ", all of the others)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save-codes", type=Path, default=None, metavar="DIR",
                        help="write each dataset's sampled code vectors to DIR/<dataset>.pt")
    parser.add_argument("--codes", type=Path, default=None, metavar="DIR",
                        help="read the code vectors from DIR/<dataset>.pt (written by "
                             "--save-codes) instead of fitting")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = None if args.codes else create_backbone(args.backbone)
    result = dict(backbone=args.backbone, steps=args.steps, seed=args.seed,
                  k_values=[args.k_min, args.k_max], codes=str(args.codes) if args.codes else None,
                  torch_threads=torch.get_num_threads(),
                  datasets={})
    t0 = time.perf_counter()
    if args.sample:
        result["datasets"][args.sample] = run_sample(args.sample, args, backbone)
    for root in dataset_dirs(args.data) if args.data else []:
        result["datasets"][root.name] = run_dataset(root, args, backbone)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    ds = result["datasets"].values()
    result["within_1"] = sum(d["within_1"] for d in ds)
    result["no_clear_k"] = sum(d["unclear"] is not None for d in ds)
    result["n_datasets"] = len(result["datasets"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
