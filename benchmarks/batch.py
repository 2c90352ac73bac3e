"""Batch segmentation throughput: files/s and Mpx/s over a folder of synthetic TIFFs.

Usage:
    python benchmarks/batch.py --n-files 100 --size 1024 --workers 1 2

Writes ``--n-files`` synthetic ``--size`` x ``--size`` uint16 TIFFs (smooth blobs plus
texture and noise), fits a small model on two crops with the offline backbone
(``efficientnet_lite0``; throughput does not depend on how well it is trained), then runs
``segment_files`` over the folder:

* ``threads``: the default in-process scheduler, one worker thread (torch uses every core);
* ``dask-N``: a ``distributed.LocalCluster`` of N single-threaded worker processes, for each
  N in ``--workers`` (dask's nanny sets ``OMP_NUM_THREADS=1``, so one torch thread each);
* ``resume``: the same command again over the finished folder (validation only).

Cluster start-up and the first model load on each worker (torch import included) are
timed apart: the runs measure steady-state throughput. Each run also reports the CPU time
its segmenting processes used (``cpu_s``; this process for ``threads``, the dask workers
otherwise) and ``cores_used`` = ``cpu_s`` / wall time: on a machine shared with other work,
a run can only scale as far as the cores it actually gets. The scaling ratio is files/s with the largest N over
files/s with the smallest. Prints one JSON object (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth blobs of 3 brightness levels with a stripe texture in one, plus noise."""
    from scipy.ndimage import zoom

    coarse = rng.random((size // 64 + 1, size // 64 + 1))
    field = zoom(coarse, 64, order=3)[:size, :size]
    classes = np.digitize(field, [0.4, 0.65])
    yy, xx = np.mgrid[:size, :size]
    stripes = (np.sin((xx + yy) / 3.0) > 0).astype(np.float32)
    image = np.choose(classes, [np.full((size, size), 800.0), 2000 + 1500 * stripes,
                                np.full((size, size), 3600.0)])
    image += rng.normal(0, 150, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16)


def make_folder(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = synthetic_image(size, rng)
    paths = []
    for i in range(n):
        # a few distinct images, rolled, keep generation fast for 100 x 1024^2
        image = first if i % 4 else synthetic_image(size, rng)
        path = folder / f"img_{i:04d}.tif"
        tifffile.imwrite(path, np.roll(image, 37 * i, axis=1))
        paths.append(path)
    return paths


def _load_model(path: str, device: str) -> None:
    from napari_stego.batch import cached_model

    cached_model(path, device=device)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def _cpu(scheduler) -> float:
    """CPU seconds used so far by the processes that segment: this one for threads, else
    every dask worker process."""
    if isinstance(scheduler, str):
        return _cpu_seconds()
    return sum(scheduler.run(_cpu_seconds).values())


def run(label: str, model: Path, folder: Path, out: Path, scheduler, n_files: int,
        size: int, device: str = "cpu") -> dict:
    from napari_stego import segment_files

    cpu0 = _cpu(scheduler)
    t0 = time.perf_counter()
    report = segment_files(model, folder, out, scheduler=scheduler, device=device)
    seconds = time.perf_counter() - t0
    cpu = _cpu(scheduler) - cpu0
    assert report.failed == 0 and report.skipped == 0, report
    mpx = n_files * size * size / 1e6
    row = dict(run=label, seconds=round(seconds, 2), files_per_s=round(n_files / seconds, 3),
               mpx_per_s=round(mpx / seconds, 2), cpu_s=round(cpu, 1),
               cores_used=round(cpu / seconds, 2), cpu_s_per_file=round(cpu / n_files, 2),
               written=report.written,
               existing=report.existing, workers=len(report.workers))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-files", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-threads", action="store_true", help="skip the threads run")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the workers predict (cpu, cuda)")
    args = parser.parse_args()

    import torch
    from distributed import Client, LocalCluster

    from napari_stego import StegoModel
    from napari_stego.batch import cached_model

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="stego-batch-"))
    t0 = time.perf_counter()
    paths = make_folder(root / "images", args.n_files, args.size, args.seed)
    t_make = time.perf_counter() - t0
    import tifffile

    crops = [tifffile.imread(p)[:128, :128] for p in paths[:2]]
    t0 = time.perf_counter()
    model = StegoModel.fit(crops, 3, backbone="efficientnet_lite0", steps=2, device="cpu",
                           seed=args.seed)
    model_path = model.save(root / "bench.stego")
    t_fit = time.perf_counter() - t0

    result = dict(
        n_files=args.n_files, size=args.size, backbone="efficientnet_lite0", device=args.device,
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        torch=torch.__version__, python=platform.python_version(),
        load_average_start=[round(v, 2) for v in os.getloadavg()],
        make_seconds=round(t_make, 1), fit_seconds=round(t_fit, 1), runs=[])
    if not args.no_threads:
        t0 = time.perf_counter()
        cached_model(model_path, device=args.device)  # as the first plane would: load once
        warm = time.perf_counter() - t0
        row = run("threads", model_path, root / "images", root / "out-threads", "threads",
                  args.n_files, args.size, args.device)
        row["model_load_s"] = round(warm, 1)
        result["runs"].append(row)
    for n in args.workers:
        t0 = time.perf_counter()
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.wait_for_workers(n)
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()  # import torch and load the model on every worker
            client.run(_load_model, str(model_path), args.device)
            warm = time.perf_counter() - t0
            out = root / f"out-dask-{n}"
            row = run(f"dask-{n}", model_path, root / "images", out, client, args.n_files,
                      args.size, args.device)
            row["cluster_startup_s"] = round(startup, 1)
            row["model_load_s"] = round(warm, 1)
            row["torch_threads_per_worker"] = list(set(client.run(torch.get_num_threads)
                                                       .values()))
            result["runs"].append(row)
            if n == max(args.workers):
                result["runs"].append(run("resume", model_path, root / "images", out, client,
                                          args.n_files, args.size, args.device))
    dask_rows = {r["run"]: r for r in result["runs"] if r["run"].startswith("dask-")}
    if len(dask_rows) >= 2:
        lo, hi = min(args.workers), max(args.workers)
        result["scaling"] = round(dask_rows[f"dask-{hi}"]["files_per_s"]
                                  / dask_rows[f"dask-{lo}"]["files_per_s"], 2)
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
