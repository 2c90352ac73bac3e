"""Dense-CRF speed and agreement: pydensecrf (reference) vs the torch backend.

Usage:
    python benchmarks/crf.py                      # CPU (and CUDA when there is a GPU)
    python benchmarks/crf.py --sizes 1024 2048 --classes 10 --devices cuda

For each size (square mosaics of skimage sample images, with blurry STEGO-like probabilities
from a soft colour k-means) it times every backend / device and reports Mpx/s and the share of
pixels whose argmax label agrees with pydensecrf. The torch backend is timed "cold" (lattices
built from scratch) and "warm" (the position lattice reused, as for the tiles of a big image or
the slices of a stack). It also scores agreement on real natural and microscopy images
(skimage samples, ../shared/data when present) and the seam error of tiled vs whole-image CRF.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from skimage import data, transform

from napari_stego import crf
from napari_stego.crf import crf_image, dense_crf, dense_crf_tiled, has_pydensecrf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def colour_probs(image, k=6, stride=8, temp=20.0, seed=0):
    """Soft k-means of colours on a coarse grid, bilinearly up-sampled (like STEGO's probs)."""
    rgb = crf_image(image).astype(np.float32) / 255
    h, w = rgb.shape[:2]
    small = transform.resize(rgb, (max(h // stride, 2), max(w // stride, 2)), anti_aliasing=True)
    x = small.reshape(-1, 3).astype(np.float32)
    cent, _ = kmeans2(x, k, seed=seed, minit="++")
    logits = -temp * ((x[:, None] - cent[None]) ** 2).sum(-1).T.reshape(k, *small.shape[:2])
    up = F.interpolate(torch.from_numpy(logits.astype(np.float32))[None], size=(h, w),
                       mode="bilinear", align_corners=False)
    return torch.softmax(up[0], 0).numpy()


def mosaic(size):
    half = size // 2
    ims = [data.astronaut(), data.coffee(), data.immunohistochemistry(), data.chelsea()]
    tiles = [transform.resize(im, (half, half), preserve_range=True).astype(np.uint8) for im in ims]
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)


def real_images():
    from skimage.io import imread

    out = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
           "immunohistochemistry": data.immunohistochemistry(), "camera": data.camera()}
    for name, folder in [("isbi2012_em", "isbi2012_em_membrane"), ("wbc", "wbc_jiangxi_tecom"),
                         ("outex", "outex_texture_mosaics"), ("camvid", "camvid11")]:
        files = sorted((SHARED / folder / "images").glob("*.png"))
        if files:
            im = imread(files[0])
            out[name] = im[..., :3] if im.ndim == 3 else im
    return out


def run(image, probs, backend, device=None, cold=True):
    """(Q, wall seconds, CPU seconds of this process)."""
    if cold:
        crf._POS_CACHE.clear()
    t, c = time.perf_counter(), time.process_time()
    q = dense_crf(image, probs, backend=backend, device=device)
    return q, time.perf_counter() - t, time.process_time() - c


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="torch CPU thread counts to time")
    ap.add_argument("--no-tiled", action="store_true", help="skip the tiled vs whole check")
    ap.add_argument("--no-real", action="store_true", help="skip the real-image agreement")
    args = ap.parse_args()
    have_ref = has_pydensecrf()
    result = dict(
        machine=dict(cpu=cpu_name(), cores=os.cpu_count(),
                     load_avg_before=os.getloadavg()[0], torch=torch.__version__,
                     gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None),
        classes=args.classes, iterations=crf.CRFConfig().iterations, speed=[], agreement_real=[],
    )
    # warm-up (imports, allocator)
    small = mosaic(64)
    dense_crf(small, colour_probs(small, k=2), backend="torch", device="cpu")

    for size in sorted(args.sizes):
        image = mosaic(size)
        probs = colour_probs(image, k=args.classes)
        mpx = size * size / 1e6
        ref = None
        rows = []
        if have_ref:
            ref, dt, cpu = run(image, probs, "pydensecrf")
            rows.append(dict(size=size, backend="pydensecrf", device="cpu (1 core)",
                             seconds=round(dt, 3), cpu_seconds=round(cpu, 3),
                             mpx_per_s=round(mpx / dt, 3), agreement=1.0))
        runs = [("cuda", None)] if "cuda" in args.devices else []
        runs += [("cpu", t) for t in args.threads] if "cpu" in args.devices else []
        for device, threads in runs:
            if device == "cuda" and not torch.cuda.is_available():
                rows.append(dict(size=size, backend="torch", device="cuda", measured=False,
                                 reason="no CUDA GPU on this machine"))
                continue
            if threads is not None:
                torch.set_num_threads(threads)
            if device == "cuda":  # warm-up: CUDA context, cuSPARSE handles
                run(mosaic(256), colour_probs(mosaic(256), k=args.classes), "torch", device)
            q, cold, cold_cpu = run(image, probs, "torch", device, cold=True)
            _, warm, _ = run(image, probs, "torch", device, cold=False)
            row = dict(size=size, backend="torch",
                       device=device if threads is None else f"cpu ({threads} thread{'s' * (threads > 1)})",
                       seconds=round(cold, 3), cpu_seconds=round(cold_cpu, 3),
                       mpx_per_s=round(mpx / cold, 3), seconds_warm=round(warm, 3),
                       mpx_per_s_warm=round(mpx / warm, 3))
            if ref is not None:
                row["agreement"] = round(float((q.argmax(0) == ref.argmax(0)).mean()), 5)
                row["max_abs_dq"] = round(float(np.abs(q - ref).max()), 5)
            rows.append(row)
        torch.set_num_threads(max(args.threads))
        whole = dict(image=image, probs=probs, torch=q.argmax(0) if runs else None,
                     pydensecrf=None if ref is None else ref.argmax(0))
        result["speed"] += rows
        print(json.dumps(rows), flush=True)

    if have_ref and not args.no_real:
        for name, image in real_images().items():
            probs = colour_probs(image, k=4)
            ref = dense_crf(image, probs, backend="pydensecrf")
            q = dense_crf(image, probs, backend="torch", device="cpu")
            agree = float((q.argmax(0) == ref.argmax(0)).mean())
            changed = float((ref.argmax(0) != probs.argmax(0)).mean())
            result["agreement_real"].append(dict(image=name, shape=list(image.shape),
                                                 agreement=round(agree, 5),
                                                 changed_by_crf=round(changed, 4)))

    if not args.no_tiled:  # the largest size again, tile by tile, against its whole-image run
        size = max(args.sizes)
        tiled = dict(size=size, tile=1024, halo=crf.default_halo())
        device = "cuda" if torch.cuda.is_available() and "cuda" in args.devices else "cpu"
        for backend in ["torch"] + (["pydensecrf"] if have_ref else []):
            if whole[backend] is None:
                continue
            t = time.perf_counter()
            part = dense_crf_tiled(whole["image"], whole["probs"], tile=1024, backend=backend,
                                   device=device if backend == "torch" else None).argmax(0)
            tiled[backend] = dict(disagreement_percent=round(100 * float((part != whole[backend]).mean()), 4),
                                  seconds=round(time.perf_counter() - t, 2))
        result["tiled_vs_whole"] = tiled
    result["machine"]["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
