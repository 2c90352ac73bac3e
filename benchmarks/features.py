"""Tiled feature extraction throughput: TIFF on disk -> cached features, vs the bare backbone.

Usage:
    python benchmarks/features.py                                  # CPU, offline backbone
    python benchmarks/features.py --device cuda --backbone dino_vits8 --random-weights
    python benchmarks/features.py --seams                          # + tiled-vs-whole labels

Writes a synthetic uint16 TIFF (``--size`` pixels square), then measures

* ``bare``: the backbone's forward pass alone on random tensors already on the device, at the
  pipeline's read-tile size and batch size (same autocast), in megapixels of backbone input
  per second;
* ``end_to_end``: :func:`napari_stego.feature_cache.ensure_features` from the TIFF path to a
  complete zarr feature cache on disk (opening, intensity statistics, data fingerprint,
  reading tiles, normalising, host-to-device copies, forward, float16 copies back, zarr
  writes), in megapixels of *image* per second;

and prints one JSON object with both, their ``ratio``, and the halo ``overhead`` (backbone
pixels per image pixel), so ``ratio * overhead`` is the pipeline's efficiency per backbone
pixel. ``--random-weights`` builds the architecture without weights (same speed; for
machines without the weights). ``--seams`` also fits a small model on the offline texture
mosaics and reports how many pixels of a big mosaic change label between whole-image and
tiled prediction.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_tiff(path: Path, size: int, seed: int = 0) -> Path:
    """A size x size uint16 TIFF of smooth regions and textures, written in row bands."""
    import tifffile

    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.02, 0.3, (6, 2))
    out = tifffile.memmap(str(path), shape=(size, size), dtype=np.uint16,
                          photometric="minisblack")
    band = 512
    xs = np.arange(size)[None, :]
    for y0 in range(0, size, band):
        ys = np.arange(y0, min(y0 + band, size))[:, None]
        region = ((ys // 700 + xs // 900) % 6)
        f = freqs[region]
        val = 1000 + 800 * np.sin(ys * f[..., 0]) * np.cos(xs * f[..., 1]) + 300 * region
        val += rng.normal(0, 60, val.shape)
        out[y0:y0 + band] = np.clip(val, 0, 65535).astype(np.uint16)
    out.flush()
    del out
    return path


def bare_rate(backbone, device, shape, batch, config, repeat: int) -> float:
    """Mpx/s of backbone input for a batch of ``shape`` tiles already on the device."""
    import torch

    from napari_stego._device_runner import _autocast

    x = torch.rand(batch, 3, *shape, device=device)
    with torch.inference_mode():
        for _ in range(2):
            with _autocast(device, config):
                backbone(backbone.normalize(x))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            with _autocast(device, config):
                backbone(backbone.normalize(x))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / repeat
    return batch * shape[0] * shape[1] / dt / 1e6


def seam_disagreement(backbone, device, size: int, tiles_list, steps: int, seed: int = 0):
    """Fit on the offline texture mosaics; compare whole-image and tiled labels of a big
    mosaic made of them."""
    from napari_stego import StegoModel
    from napari_stego.features import tile_halo
    from napari_stego.samples import texture_mosaics
    from napari_stego.tiling import TileConfig
    from napari_stego.train import TrainConfig

    images, _ = texture_mosaics()
    model = StegoModel.fit(list(images), 3, backbone=backbone, device=device,
                           train=TrainConfig(steps=steps, batch_size=8), seed=seed)
    rng = np.random.default_rng(seed + 1)
    side = images[0].shape[0]
    n = -(-size // side)
    big = np.concatenate([np.concatenate([images[i] for i in rng.integers(0, len(images), n)], 1)
                          for _ in range(n)], 0)[:size, :size]
    model.tile_config = TileConfig(tile=1 << 16)
    t0 = time.perf_counter()
    whole = model.predict(big)
    out = dict(image=list(big.shape), fit_steps=steps, whole_s=round(time.perf_counter() - t0, 1))
    runs = []
    for tiles in tiles_list:
        model.tile_config = tiles
        t0 = time.perf_counter()
        labels = model.predict(big)
        tile, halo = tile_halo(tiles, backbone)
        runs.append(dict(tile=tile, halo=halo, blend=tiles.blend,
                         disagree_percent=round(100 * float((labels != whole).mean()), 3),
                         seconds=round(time.perf_counter() - t0, 1)))
    out["tiled"] = runs
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="local weights file")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=4096, help="TIFF side in pixels")
    p.add_argument("--tile", type=int, default=None, help="core px (default: the backbone's)")
    p.add_argument("--halo", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3, help="timed bare forward passes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workdir", default=None, help="folder for the TIFF and the cache")
    p.add_argument("--seams", action="store_true")
    p.add_argument("--seam-size", type=int, default=2048)
    p.add_argument("--seam-steps", type=int, default=30)
    args = p.parse_args(argv)

    import torch

    from napari_stego.backbones import create_backbone
    from napari_stego.device import resolve_device
    from napari_stego.feature_cache import ensure_features
    from napari_stego.features import (
        FeatureConfig,
        _plane_jobs,
        batch_size,
        tile_halo,
    )
    from napari_stego.io import open_image
    from napari_stego.tiling import TileConfig, compute_overhead

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backbone = create_backbone(args.backbone, args.weights,
                               pretrained=not args.random_weights).to(device)
    tiles = TileConfig(tile=args.tile, halo=args.halo, batch_size=args.batch_size)
    config = FeatureConfig()
    tile, halo = tile_halo(tiles, backbone)
    n_batch = batch_size(tiles, device, backbone)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stego-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tiff = synthetic_tiff(work / f"bench_{args.size}.tif", args.size)
    source = open_image(tiff)
    jobs = _plane_jobs(0, source, backbone, config, tiles)
    shapes = [j.shape for j in jobs]
    common = max(set(shapes), key=lambda s: s[0] * s[1])  # the interior (largest) tile
    overhead = compute_overhead(source.shape2d, TileConfig(tile=tile, halo=halo),
                                backbone.spec.pad_to)
    bare = bare_rate(backbone, device, common, n_batch, config, args.repeat)

    cache = work / "cache"
    t0, c0 = time.perf_counter(), time.process_time()
    store, _ = ensure_features(backbone, source, config, tiles, cache, device)
    e2e_s, e2e_cpu = time.perf_counter() - t0, time.process_time() - c0
    mpx = args.size * args.size / 1e6
    e2e = mpx / e2e_s
    result = dict(
        benchmark="features",
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     torch=torch.__version__, threads=torch.get_num_threads(),
                     device=str(device),
                     gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None),
        backbone=args.backbone, weights="random" if args.random_weights else
        backbone.weights_source, autocast=config.autocast if device.type == "cuda" else None,
        image=[args.size, args.size], tile=tile, halo=halo, batch=n_batch,
        tiles=len(jobs), read_tile=list(common), cache_bytes=store.layout.nbytes,
        bare_mpx_s=round(bare, 3), end_to_end_mpx_s=round(e2e, 3), end_to_end_s=round(e2e_s, 1),
        end_to_end_cpu_s=round(e2e_cpu, 1),
        ratio=round(e2e / bare, 3), overhead=round(overhead, 3),
        efficiency_per_backbone_pixel=round(e2e * overhead / bare, 3),
    )
    if args.seams:
        result["seams"] = seam_disagreement(
            backbone, device, args.seam_size,
            [TileConfig(), TileConfig(tile=512, halo=128), TileConfig(tile=512, halo=64),
             TileConfig(tile=512, halo=128, blend="taper")], args.seam_steps)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
