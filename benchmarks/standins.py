"""Synthetic stand-ins for three kinds of data the unseen sets hold: solar EUV disks,
two-channel fluorescence cells and H&E histology.

Usage:
    python benchmarks/standins.py --kinds solar cells he --seeds 0 --threads 1

Issue 14 scores the defaults on labelled sets that stay unseen; three of their kinds have no
visible counterpart in ../shared/data, so a rule that acts on them (the appearance weight, its
gates, the kernel width, colour clustering) can only be checked here on drawn images. They are
drawn, not real: the backbone sees blobs and smoothed noise, so their absolute numbers say
little about real images. What they show is whether the pipeline does what a scientist
expects where brightness or a stain alone defines the classes.

* ``solar``: grey full-disk images (512 px): a mottled quiet disk brightening towards the limb,
  dark coronal holes (smooth irregular patches), bright active regions, a corona fading off the
  limb, square-root display scaling as quick-look images have. Classes: quiet disk (active
  regions included) and coronal hole, K = 2; off-disk pixels are ignored (255).
* ``cells``: RGB (384 px): cells with a dim, textured cell-body stain (green) around a bright
  nucleus stain (blue) on a dark background. Classes: background, cytoplasm, nucleus, K = 3.
* ``he``: RGB H&E tiles (384 px) rendered from stain concentrations
  (:func:`skimage.color.hed2rgb`): fibrous eosin-pink stroma, white lumina with soft edges,
  hematoxylin-blue nuclei with grainy chromatin, in clusters and scattered. Classes: background
  (stroma and lumen) and nucleus, K = 2, so the background holds two colours.

Each kind and seed is scored exactly as the unseen sets are: ``StegoModel.fit(images, K,
backbone="efficientnet_lite0", seed=seed)`` then ``predict(image)`` and ``predict(image,
crf=True)``; with the baselines of ``quality.py`` (colour k-means and raw-feature k-means,
each without and with the same CRF). Hungarian mIoU % over the set. Prints one JSON object per
kind and seed, with the fit's appearance report; ``--save DIR`` keeps the fitted models.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.color import hed2rgb

from napari_stego import StegoModel
from napari_stego.crf import dense_crf
from napari_stego.features import extract_features

from quality import colour_kmeans, features_kmeans, score  # benchmarks/ is on sys.path when run


def _noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-9)


def solar_disks(n: int = 16, size: int = 512, seed: int = 0):
    """``n`` grey ``(size, size)`` uint8 disks and their labels (0 quiet disk, 1 coronal hole,
    255 off the disk)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    images, labels = [], []
    for _ in range(n):
        radius = size * rng.uniform(0.38, 0.42)
        cy, cx = size / 2 + rng.normal(0, 3, 2)
        r = np.hypot(yy - cy, xx - cx)
        disk = r < radius
        mu = np.sqrt(np.clip(1 - (r / radius) ** 2, 0, 1))
        quiet = 0.45 * (1 + 0.25 * (1 - mu)) * np.exp(0.18 * _noise(rng, r.shape, 2)
                                                       + 0.1 * _noise(rng, r.shape, 6))
        hole = (_noise(rng, r.shape, 28) > rng.uniform(1.0, 1.5)) & disk
        if hole.sum() < 0.03 * disk.sum():  # at least one hole: a polar cap
            hole |= disk & ((yy - cy) < -0.7 * radius)
        img = quiet * (1 - 0.75 * ndi.gaussian_filter(hole.astype(float), 3))
        for _ in range(rng.integers(2, 5)):  # active regions
            ay, ax = cy + rng.uniform(-0.6, 0.6) * radius, cx + rng.uniform(-0.7, 0.7) * radius
            s = rng.uniform(10, 25)
            blob = np.exp(-((yy - ay) ** 2 + (xx - ax) ** 2) / (2 * s ** 2))
            img += 1.2 * blob * np.clip(1 + 0.5 * _noise(rng, r.shape, 1.5), 0, None)
        corona = 0.35 * np.exp(-(r - radius) / (0.08 * size)) \
            * np.exp(0.1 * _noise(rng, r.shape, 3))
        img = np.clip(np.where(disk, img, corona), 0, None)
        img = np.sqrt(img / np.percentile(img, 99.8))
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        images.append((img * 255).astype(np.uint8))
        lab = hole.astype(np.uint8)
        lab[~disk] = 255
        labels.append(lab)
    return images, labels


def two_channel_cells(n: int = 16, size: int = 384, seed: int = 0):
    """``n`` RGB ``(size, size, 3)`` uint8 images and their labels (0 background,
    1 cytoplasm, 2 nucleus)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    images, labels = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.uint8)
        body, nucleus = np.zeros((size, size)), np.zeros((size, size))
        for _ in range(rng.integers(6, 12)):
            cy, cx = rng.uniform(0, size, 2)
            rc = rng.uniform(25, 45)
            angle = np.arctan2(yy - cy, xx - cx)
            wobble = 1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6)) \
                + 0.15 * np.sin(5 * angle + rng.uniform(0, 6))
            cell = np.hypot(yy - cy, xx - cx) < rc * wobble
            rn = rc * rng.uniform(0.35, 0.5)
            oy, ox = rng.normal(0, rc * 0.1, 2)
            nuc = ((yy - cy - oy) / rn) ** 2 \
                + ((xx - cx - ox) / (rn * rng.uniform(0.7, 1.0))) ** 2 < 1
            body = np.maximum(body, cell * rng.uniform(0.25, 0.6))
            nucleus = np.maximum(nucleus, nuc * rng.uniform(0.6, 1.0))
            lab[cell & (lab == 0)] = 1
            lab[nuc] = 2
        body = ndi.gaussian_filter(body * np.clip(1 + 0.4 * _noise(rng, lab.shape, 2), 0, None), 1.5)
        nucleus = ndi.gaussian_filter(
            nucleus * np.clip(1 + 0.2 * _noise(rng, lab.shape, 1.5), 0, None), 1.2)
        rgb = np.stack([0.15 * body, body, nucleus], -1) + rng.normal(0.03, 0.015, (size, size, 3))
        images.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
        labels.append(lab)
    return images, labels


def _ellipse(yy, xx, cy, cx, a, b, angle) -> np.ndarray:
    u = ((yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)) / a
    v = (-(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)) / b
    return u ** 2 + v ** 2 < 1


def he_tiles(n: int = 16, size: int = 384, seed: int = 0):
    """``n`` RGB ``(size, size, 3)`` uint8 H&E tiles and their labels (0 background: stroma
    and lumen, 1 nucleus)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    shape = (size, size)
    images, labels = [], []
    for _ in range(n):
        lumen = _noise(rng, shape, 30) > rng.uniform(0.7, 1.3)
        edge = ndi.gaussian_filter(lumen.astype(float), 2)
        fibres = ndi.rotate(ndi.gaussian_filter(rng.standard_normal(shape), (1, 6)),
                            rng.uniform(0, 180), reshape=False, mode="reflect")
        eosin = np.clip(1 + 0.35 * fibres / fibres.std() + 0.2 * _noise(rng, shape, 10), 0.1, None)
        nuclei, hema = np.zeros(shape, bool), np.zeros(shape)
        spots = [(rng.uniform(0, size, 2), rng.uniform(30, 50), rng.integers(15, 35), (5, 11, 4, 8))
                 for _ in range(rng.integers(3, 7))]  # clustered nuclei
        spots.append((None, None, rng.integers(20, 50), (4, 9, 2.5, 5)))  # scattered ones
        for centre, spread, count, (a0, a1, b0, b1) in spots:
            for _ in range(count):
                cy, cx = (rng.uniform(0, size, 2) if centre is None
                          else centre + rng.normal(0, spread, 2))
                blob = _ellipse(yy, xx, cy, cx, rng.uniform(a0, a1), rng.uniform(b0, b1),
                                rng.uniform(0, np.pi))
                nuclei |= blob
                hema = np.maximum(hema, blob * rng.uniform(0.6, 1.0))
        nuclei &= ~lumen
        chromatin = np.clip(1 + 0.35 * _noise(rng, shape, 1.2), 0.2, None)
        h = ndi.gaussian_filter(hema * ~lumen * chromatin, 0.8) * 0.11 + 0.006
        e = ndi.gaussian_filter(eosin * (1 - 0.7 * nuclei), 0.8) * 0.03 * rng.uniform(0.7, 1.3)
        hed = np.stack([h * (1 - edge), e * (1 - edge), np.zeros(shape)], -1)
        rgb = hed2rgb(hed) + rng.normal(0, 0.012, (size, size, 3))
        images.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
        labels.append(nuclei.astype(np.uint8))
    return images, labels


KINDS = {"solar": (solar_disks, 2), "cells": (two_channel_cells, 3), "he": (he_tiles, 2)}


def run(kind: str, seed: int, n_images: int, save: str | None = None) -> dict:
    make, k = KINDS[kind]
    images, labels = make(n=n_images, seed=100 + seed)
    t0 = time.perf_counter()
    model = StegoModel.fit(images, k, backbone="efficientnet_lite0", seed=seed)
    fit_s = time.perf_counter() - t0
    if save:
        model.save(Path(save) / f"{kind}_s{seed}.stego")

    def miou(preds) -> float:
        return round(score(preds, labels, k, k, False)["miou"], 1)

    with torch.inference_mode():
        maps = [extract_features(model.backbone, im, model.feature_config).float()
                for im in images]
    stride, config = model.backbone.stride, model.feature_config
    colour_p = colour_kmeans(images, k, seed, proba=True)
    raw_p = features_kmeans(maps, images, k, seed, stride, config, alpha=2.0)
    crf = lambda probs: [dense_crf(im, p).argmax(0) for im, p in zip(images, probs)]  # noqa: E731
    return dict(kind=kind, seed=seed, n_images=n_images, k=k, fit_s=round(fit_s, 1),
                stego=miou([model.predict(im) for im in images]),
                stego_crf=miou([model.predict(im, crf=True) for im in images]),
                colour=miou([p.argmax(0) for p in colour_p]), colour_crf=miou(crf(colour_p)),
                raw=miou([p.argmax(0) for p in raw_p]), raw_crf=miou(crf(raw_p)),
                appearance=model.info.get("appearance"), shifts=model.info.get("shifts"),
                cluster_shares=model.info.get("cluster_shares"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save", default=None, help="folder to save the fitted models in")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for kind in args.kinds:
        for seed in args.seeds:
            print(json.dumps(run(kind, seed, args.n_images, args.save)), flush=True)


if __name__ == "__main__":
    main()
