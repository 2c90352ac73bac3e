"""GPU probe: tiled features on the device vs the CPU, and where the torch CRF spends its time.

Usage:
    python benchmarks/gpu_probe.py          # on a CUDA machine (falls back to the CPU)

Prints the cosine similarity of tiled ``efficientnet_lite0`` features computed on the device and
on the CPU (a 1500² uint16 image in 512-pixel tiles, so ``extract_source`` with batches), the
torch CRF's time with 0 / 1 / 10 mean-field iterations at 1024², 2048² and 4096² (0 = lattice
set-up and host/device copies only), and a ``torch.profiler`` table of one 2048² call.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from crf import colour_probs, mosaic

from napari_stego.backbones import create_backbone
from napari_stego.crf import dense_crf
from napari_stego.features import FeatureConfig, extract_features
from napari_stego.tiling import TileConfig


def synthetic_uint16(size: int = 1500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = (1000 + 800 * np.sin(yy / 23.0) * np.cos(xx / 41.0)
           + 300 * ((yy // 400 + xx // 500) % 4) + rng.normal(0, 60, yy.shape))
    return img.clip(0, 65535).astype(np.uint16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def feature_agreement(device: str) -> str:
    img, tiles = synthetic_uint16(), TileConfig(tile=512)
    backbone = create_backbone("efficientnet_lite0")
    t = time.perf_counter()
    f_cpu = extract_features(backbone, img, FeatureConfig(), "cpu", tiles=tiles).float()
    t_cpu = time.perf_counter() - t
    backbone = backbone.to(device)
    extract_features(backbone, img, FeatureConfig(), device, tiles=tiles)  # warm-up
    t = time.perf_counter()
    f_dev = extract_features(backbone, img, FeatureConfig(), device, tiles=tiles).float()
    t_dev = time.perf_counter() - t
    cos = torch.nn.functional.cosine_similarity(f_cpu, f_dev, dim=0)
    rel = (f_cpu - f_dev).norm() / f_cpu.norm()
    return (f"FEATURES tiled {tuple(f_cpu.shape)}: cpu {t_cpu:.2f} s, {device} {t_dev:.2f} s; "
            f"cosine mean {cos.mean():.5f} min {cos.min():.5f}; relative error {rel:.4f}")


def crf_split(device: str, size: int) -> str:
    image = mosaic(size)
    probs = colour_probs(image, k=6)
    dense_crf(image, probs, backend="torch", device=device)  # warm-up
    times = []
    for iterations in (0, 1, 10):
        sync(device)
        t = time.perf_counter()
        dense_crf(image, probs, backend="torch", device=device, iterations=iterations)
        sync(device)
        times.append(time.perf_counter() - t)
    return (f"CRF {size}²: iterations 0 / 1 / 10: "
            + " / ".join(f"{x * 1000:.1f} ms" for x in times)
            + f" -> {size * size / 1e6 / times[-1]:.1f} Mpx/s")


def crf_profile(device: str, size: int = 2048) -> str:
    image = mosaic(size)
    probs = colour_probs(image, k=6)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        dense_crf(image, probs, backend="torch", device=device)
        sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=50)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(feature_agreement(device), flush=True)
    for size in (1024, 2048, 4096):
        print(crf_split(device, size), flush=True)
    print(crf_profile(device))


if __name__ == "__main__":
    main()
