"""One script for the GPU targets: training step, whole fit, ViT features, torch CRF.

Usage:
    python benchmarks/gpu_suite.py                      # the first CUDA GPU (else the CPU)
    python benchmarks/gpu_suite.py --device cpu --quick # a CPU check in under 3 minutes

Measures on the device it is given and prints one JSON object:

* ``train_step_ms``: one training step at batch 16 on cached feature maps the size of
  ViT-S/8's (384 channels, 64 x 64 cells = 512 px images), as the difference of two
  :func:`~napari_stego.train.train_head` runs of different lengths divided by the extra steps
  (the set-up -- KNN table, automatic shifts, PCA start -- cancels out);
* ``fit_s``: :meth:`StegoModel.fit` on 30 texture mosaics of 512 px with the package's default
  steps, features included (``dino_vits8`` with random weights: the speed of the real network,
  without its weights, which this machine may not have; ``--fit-backbone`` changes it);
* ``features_mpx_s`` / ``features_bare_mpx_s``: ``dino_vits8`` (random weights) from a uint16
  TIFF on disk (8192²) to a complete feature cache, and the bare forward pass at the same tile
  and batch (``benchmarks/features.py``'s measurements; ``--tile`` changes the tile, default
  the package's);
* ``crf_mpx_s``: the torch CRF at 1024² and 2048² with C = 6 (the largest size's figure is the
  headline), with its label agreement to pydensecrf when that is installed
  (``benchmarks/crf.py``'s images and probabilities).

``--quick`` shrinks every part (3 and 13 training steps; a fit of 6 images of 128 px for 10
steps; a 512² TIFF in 256 px tiles for the features; the CRF at 256² and 512²) so that a
2-core CPU finishes in under 3 minutes; its figures check that the suite runs, they are not
the targets' figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from crf import colour_probs, cpu_name, mosaic
from crf import run as crf_run
from features import bare_rate, synthetic_tiff

from napari_stego import StegoModel
from napari_stego.backbones import create_backbone
from napari_stego.crf import has_pydensecrf
from napari_stego.device import resolve_device
from napari_stego.feature_cache import ensure_features
from napari_stego.features import FeatureConfig, _plane_jobs, batch_size, tile_halo
from napari_stego.io import open_image
from napari_stego.samples import texture_mosaics
from napari_stego.tiling import TileConfig
from napari_stego.train import TrainConfig, train_head


def sig(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits (CPU rates are small numbers)."""
    return float(f"{x:.{digits}g}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def train_step(device: torch.device, steps: tuple[int, int], maps_n: int = 30,
               channels: int = 384, cells: int = 64, seed: int = 0) -> dict:
    """Milliseconds per training step (batch 16) on random float16 maps of ViT-S/8's size."""
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(channels, cells, cells, generator=gen).half() for _ in range(maps_n)]
    config = TrainConfig(batch_size=16)
    train_head(maps, TrainConfig(batch_size=16, steps=2), device=device, n_clusters=6)  # warm-up
    short, t_short = timed(device, lambda: train_head(
        maps, TrainConfig(batch_size=16, steps=steps[0]), device=device, n_clusters=6))
    long, t_long = timed(device, lambda: train_head(
        maps, TrainConfig(batch_size=16, steps=steps[1]), device=device, n_clusters=6))
    ms = 1000 * (t_long - t_short) / (steps[1] - steps[0])
    return dict(train_step_ms=sig(ms), train_steps=list(steps),
                train_runs_s=[round(t_short, 2), round(t_long, 2)],
                train_maps=[maps_n, channels, cells, cells], train_batch=config.batch_size)


def whole_fit(device: torch.device, backbone_name: str, n: int, size: int, steps: int | None) -> dict:
    """Seconds for a whole fit (features included) of ``n`` mosaics of ``size`` px."""
    images, _ = texture_mosaics(n, size)
    backbone = create_backbone(backbone_name, pretrained=backbone_name == "efficientnet_lite0")
    train = TrainConfig() if steps is None else TrainConfig(steps=steps)
    _, seconds = timed(device, lambda: StegoModel.fit(
        images, 3, backbone=backbone, device=device, train=train, axes="ZYX", cache=False))
    return dict(fit_s=round(seconds, 2), fit_images=[n, size, size], fit_steps=train.steps,
                fit_backbone=backbone_name + ("" if backbone_name == "efficientnet_lite0"
                                              else " (random weights)"))


def features(device: torch.device, size: int, tile: int | None, repeat: int) -> dict:
    """End-to-end and bare feature rates of ``dino_vits8`` (random weights) at ``tile``
    (``None``: the package's default tiling)."""
    backbone = create_backbone("dino_vits8", pretrained=False).to(device)
    tiles = TileConfig() if tile is None else TileConfig(tile=tile)
    config = FeatureConfig()
    t, halo = tile_halo(tiles, backbone)
    n_batch = batch_size(tiles, device)
    with tempfile.TemporaryDirectory(prefix="stego-gpu-suite-") as tmp:
        source = open_image(synthetic_tiff(Path(tmp) / "bench.tif", size))
        shapes = [j.shape for j in _plane_jobs(0, source, backbone, config, tiles)]
        common = max(set(shapes), key=lambda s: s[0] * s[1])
        bare = bare_rate(backbone, device, common, n_batch, config, repeat)
        _, seconds = timed(device, lambda: ensure_features(
            backbone, source, config, tiles, Path(tmp) / "cache", device))
    e2e = size * size / 1e6 / seconds
    return dict(features_mpx_s=sig(e2e), features_bare_mpx_s=sig(bare),
                features_ratio=sig(e2e / bare), features_image=[size, size],
                features_tile=t, features_halo=halo, features_batch=n_batch,
                features_read_tile=list(common))


def crf_rates(device: torch.device, sizes: list[int], classes: int = 6) -> dict:
    """Torch CRF Mpx/s per size (warm-up first) and label agreement with pydensecrf."""
    small = mosaic(256)
    crf_run(small, colour_probs(small, k=classes), "torch", device)  # warm-up
    rows = []
    for size in sizes:
        image = mosaic(size)
        probs = colour_probs(image, k=classes)
        q, seconds, _ = crf_run(image, probs, "torch", device, cold=True)
        sync(device)
        row = dict(size=size, seconds=round(seconds, 3), mpx_s=sig(size * size / 1e6 / seconds))
        if has_pydensecrf():
            ref, ref_s, _ = crf_run(image, probs, "pydensecrf")
            row["agreement"] = round(float((q.argmax(0) == ref.argmax(0)).mean()), 5)
            row["pydensecrf_s"] = round(ref_s, 3)
        rows.append(row)
    return dict(crf_mpx_s=rows[-1]["mpx_s"], crf_agreement=rows[-1].get("agreement"),
                crf_classes=classes, crf=rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="small sizes: a CPU check in < 3 min")
    p.add_argument("--fit-backbone", default="dino_vits8")
    p.add_argument("--tile", type=int, default=None,
                   help="feature tile side in px (default: the package's TileConfig)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "fit", "features", "crf"])
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    q = args.quick
    result: dict = dict(
        benchmark="gpu_suite", quick=q,
        machine=dict(platform=platform.platform(), cpu=cpu_name(), torch=torch.__version__,
                     threads=torch.get_num_threads(), device=str(device),
                     gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None))
    parts = [
        ("train", lambda: train_step(device, (3, 13) if q else (50, 250))),
        ("fit", lambda: whole_fit(device, args.fit_backbone, 6 if q else 30, 128 if q else 512,
                                  10 if q else None)),
        ("features", lambda: features(device, 512 if q else 8192, args.tile or (256 if q else None),
                                      1 if q else 3)),
        ("crf", lambda: crf_rates(device, [256, 512] if q else [1024, 2048])),
    ]
    seconds = {}
    for name, fn in parts:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        result.update(fn())
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: seconds[name]}), flush=True)
    result["part_seconds"] = seconds
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
