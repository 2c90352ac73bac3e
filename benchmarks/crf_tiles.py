"""Tiled dense CRF of one big image: backends and tile parallelism (threads) compared.

Usage:
    python benchmarks/crf_tiles.py                           # 1349 x 1030, 6 classes
    python benchmarks/crf_tiles.py --size 2048 2048 --workers 1 2

Times :func:`napari_stego.crf.dense_crf_tiled` (1024-px tiles, the default halo) for each
backend and ``workers`` value, and measures whether pydensecrf releases Python's GIL: a
pure-Python counter runs in a second thread during one pydensecrf call and its rate is
compared with its rate while the main thread sleeps (a backend that releases the GIL leaves
the counter near full speed). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time

import numpy as np

from napari_stego.crf import dense_crf, dense_crf_tiled, has_pydensecrf


def inputs(h, w, k, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    regions = ((yy // 97 + xx // 131) % k).astype(np.int64)
    image = (regions * (255 // k) + rng.normal(0, 20, (h, w))).clip(0, 255).astype(np.uint8)
    logits = rng.normal(0, 1, (k, h, w)).astype(np.float32)
    logits[regions, yy, xx] += 1.5
    probs = np.exp(logits - logits.max(0))
    return np.repeat(image[..., None], 3, -1), (probs / probs.sum(0)).astype(np.float32)


def gil_share(image, probs):
    """Counter rate in a second thread during a pydensecrf call / while idle."""
    count, stop = [0], [False]

    def spin():
        while not stop[0]:
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.3)
    c0, t0 = count[0], time.perf_counter()
    time.sleep(1.0)
    idle = (count[0] - c0) / (time.perf_counter() - t0)
    c0, t0 = count[0], time.perf_counter()
    dense_crf(image, probs, backend="pydensecrf")
    busy = (count[0] - c0) / (time.perf_counter() - t0)
    stop[0] = True
    thread.join()
    return busy / idle


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[1349, 1030])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=["pydensecrf", "torch"])
    args = parser.parse_args()
    h, w = args.size
    image, probs = inputs(h, w, args.classes)
    backends = [b for b in args.backends if b != "pydensecrf" or has_pydensecrf()]
    out = dict(size=[h, w], classes=args.classes, cpus=os.cpu_count(),
               machine=platform.processor() or platform.machine(),
               load_average=os.getloadavg(),
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(), runs=[])
    if "pydensecrf" in backends:
        small = (slice(0, 400), slice(0, 400))
        out["pydensecrf_gil_free_share"] = round(gil_share(image[small], probs[(slice(None), *small)]), 4)
    reference = None
    for backend in backends:
        for workers in args.workers:
            t = time.perf_counter()
            q = dense_crf_tiled(image, probs, backend=backend, workers=workers)
            seconds = time.perf_counter() - t
            labels = q.argmax(0)
            reference = labels if reference is None else reference
            out["runs"].append(dict(backend=backend, workers=workers, seconds=round(seconds, 2),
                                    mpx_per_s=round(h * w / seconds / 1e6, 4),
                                    labels_equal_first=round(float((labels == reference).mean()), 5)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
