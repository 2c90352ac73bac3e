"""Peak memory of big-data segmentation: fit + lazy prediction of TIFFs, written to disk.

Usage:
    python benchmarks/memory.py                     # the sizes run on a 2-core VM (~30 min)
    python benchmarks/memory.py --images 16384 --stacks 200x2048   # the issue's sizes

For each size, a synthetic uint16 TIFF (a 2D mosaic ``N x N`` or a stack ``Z x N x N``) is
written first (by this process, in row bands), then a fresh Python process segments it end
to end on the CPU with the offline backbone:

1. ``StegoModel.fit(path, K, cache=...)``: stack-wide intensity statistics, tiled features
   into the zarr cache on disk, training on crops of the cached maps, k-means;
2. ``model.predict_lazy(path, cache=...)`` -> ``labels.to_zarr(...)``: labels computed chunk by
   chunk from the cached features and written to disk.

The child reports its peak resident memory (``ru_maxrss``), the peak of each stage (sampled
every 0.1 s with psutil) and the time of each stage; this script prints one JSON object with
all runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_tiff(path: Path, shape: tuple[int, ...], seed: int = 0) -> Path:
    """A contiguous uint16 TIFF of textured regions, ``(N, N)`` or ``(Z, N, N)``."""
    import tifffile

    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.03, 0.4, (6, 2))
    axes = "YX" if len(shape) == 2 else "ZYX"
    out = tifffile.memmap(str(path), shape=shape, dtype=np.uint16, photometric="minisblack",
                          metadata={"axes": axes})
    planes = [out] if len(shape) == 2 else [out[z] for z in range(shape[0])]
    n = shape[-1]
    xs = np.arange(n)[None, :]
    for z, plane in enumerate(planes):
        for y0 in range(0, n, 256):
            ys = np.arange(y0, min(y0 + 256, n))[:, None]
            region = ((ys // 300 + xs // 400 + z) % 6)
            f = freqs[region]
            val = 1500 + 900 * np.sin(ys * f[..., 0] + z) * np.cos(xs * f[..., 1]) + 400 * region
            val += rng.normal(0, 80, val.shape)
            plane[y0:y0 + 256] = np.clip(val, 0, 65535).astype(np.uint16)
        out.flush()
    del planes, out
    return path


def run_child(tiff: str, work: str, n_clusters: int, steps: int, threads: int) -> dict:
    """Segment ``tiff`` end to end in this process and report memory and time."""
    import resource
    import threading

    import psutil
    import torch

    torch.set_num_threads(threads)
    proc = psutil.Process()
    stage = {"name": "import"}
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = proc.memory_info().rss / 2**20
            peaks[stage["name"]] = max(peaks.get(stage["name"], 0.0), rss)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from napari_stego import StegoModel
    from napari_stego.train import TrainConfig

    times = {}
    cache = Path(work) / "cache"
    t0 = time.perf_counter()

    def progress(name, done, total):
        # after the last tile: KNN, automatic shifts and head set-up until training starts
        stage["name"] = "prepare" if name == "features" and done == total else name

    stage["name"] = "open"
    model = StegoModel.fit(tiff, n_clusters, backbone="efficientnet_lite0", device="cpu",
                           train=TrainConfig(steps=steps), cache=cache, seed=0,
                           progress=progress)
    times["fit_s"] = round(time.perf_counter() - t0, 1)
    stage["name"] = "predict"
    t1 = time.perf_counter()
    labels = model.predict_lazy(tiff, cache=cache)
    labels.to_zarr(str(Path(work) / "labels.zarr"), overwrite=True)
    times["predict_s"] = round(time.perf_counter() - t1, 1)
    stop.set()
    sampler.join()
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return dict(shape=list(labels.shape), megapixels=round(int(np.prod(labels.shape)) / 1e6, 1),
                peak_rss_mb=round(usage.ru_maxrss / 1024),
                cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
                stage_peak_rss_mb={k: round(v) for k, v in peaks.items()},
                cache_mb=round(cache_bytes / 1e6), n_train_maps=model.info.get("n_train_maps"),
                **times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", default="8192,11584", help="2D mosaic sides, comma-separated")
    p.add_argument("--stacks", default="16x2048,32x2048", help="ZxN stacks, comma-separated")
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="training steps (time, not memory)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep TIFFs, caches and labels")
    p.add_argument("--child", nargs=2, metavar=("TIFF", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(*args.child, args.clusters, args.steps, args.threads)))
        return {}

    shapes = [(int(s),) * 2 for s in args.images.split(",") if s]
    shapes += [(int(z), int(n), int(n)) for z, n in (s.split("x") for s in args.stacks.split(",") if s)]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="stego-memory-"))
    runs = []
    for shape in shapes:
        work = root / "x".join(map(str, shape))
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tiff = write_tiff(work / "input.tif", shape)
        made = round(time.perf_counter() - t0, 1)
        cmd = [sys.executable, __file__, "--child", str(tiff), str(work),
               "--clusters", str(args.clusters), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        t0 = time.perf_counter()
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"run {shape} failed:\n{out.stderr[-4000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run.update(input=list(shape), tiff_mb=round(tiff.stat().st_size / 1e6), write_tiff_s=made,
                   wall_s=round(time.perf_counter() - t0, 1))
        runs.append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    result = dict(benchmark="memory", machine=dict(platform=platform.platform(),
                                                   cpus=os.cpu_count(), torch=torch.__version__,
                                                   threads=args.threads),
                  clusters=args.clusters, steps=args.steps, runs=runs)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
