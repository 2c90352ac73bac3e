"""The same fit on the CPU and on a GPU: time, quality, and whether a GPU model runs on a CPU.

Usage:
    python benchmarks/devices.py                       # cpu and cuda (when there is one)
    python benchmarks/devices.py --devices cpu --steps 50

Fits the offline backbone's STEGO head on the texture mosaics (``samples.texture_mosaics``,
brick / grass / gravel with their class maps) once per device with the same seed, and reports
for each device: fit seconds, predict seconds (with and without the CRF; the CRF's default
backend on that device), and Hungarian-matched mIoU. Then it saves the model fitted on the
first GPU in ``--devices`` (else the first device), loads it on the CPU and reports the share
of pixels whose label equals the saving device's prediction (a model fitted on a workstation
GPU must give the same labels on a laptop: only floating-point rounding and bf16 features may
differ). Prints one JSON object.
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

from napari_stego import StegoModel
from napari_stego.metrics import confusion_matrix, hungarian_scores
from napari_stego.samples import texture_mosaics
from napari_stego.train import TrainConfig


def miou(preds, labels, k: int) -> float:
    conf = sum(confusion_matrix(p, t, k, k) for p, t in zip(preds, labels))
    return round(float(hungarian_scores(conf)["miou"]), 1)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, round(time.perf_counter() - t0, 2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    images, labels = texture_mosaics(args.images, args.size)
    k = 3
    result: dict = dict(
        benchmark="devices", machine=dict(platform=platform.platform(), torch=torch.__version__,
                                          threads=torch.get_num_threads(),
                                          gpu=torch.cuda.get_device_name(0)
                                          if torch.cuda.is_available() else None),
        images=[args.images, args.size, args.size], steps=args.steps, runs=[])
    keep = None  # (model, labels) to reload on the CPU: the first GPU's, else the first
    for device in args.devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            result["runs"].append(dict(device=device, measured=False, reason="no CUDA GPU"))
            continue
        model, fit_s = timed(lambda: StegoModel.fit(
            list(images), k, backbone="efficientnet_lite0", device=device, seed=args.seed,
            train=TrainConfig(steps=args.steps)))
        preds, predict_s = timed(lambda: [model.predict(im) for im in images])
        refined, crf_s = timed(lambda: [model.predict(im, crf=True) for im in images])
        result["runs"].append(dict(device=device, fit_s=fit_s, predict_s=predict_s,
                                   predict_crf_s=crf_s, stego_miou=miou(preds, labels, k),
                                   stego_crf_miou=miou(refined, labels, k),
                                   final_loss=round(model.info["final_loss"], 4)))
        if keep is None or (keep[0].device.type == "cpu" and model.device.type != "cpu"):
            keep = (model, preds)
    if keep is not None:
        model, preds = keep
        with tempfile.TemporaryDirectory() as tmp:
            path = model.save(Path(tmp) / "model.stego")
            on_cpu = StegoModel.load(path, device="cpu")
        again = [on_cpu.predict(im) for im in images]
        result["reload_on_cpu"] = dict(
            saved_on=str(model.device),
            label_agreement=round(float(np.mean([(a == b).mean() for a, b in zip(again, preds)])), 5),
            stego_miou=miou(again, labels, k))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
