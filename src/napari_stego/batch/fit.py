"""``fit_files``: fit a model on every plane of some TIFF files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import StegoError
from ..outputs import check_model_out, remove_model_partials
from .inputs import _blank_reason, _short, expand_inputs, read_planes
from .reports import FileResult, FitReport, Log, Progress


def fit_files(inputs, out: str | os.PathLike, *, n_clusters: int,
              backbone: str = "dino_vits8", weights: str | os.PathLike | None = None,
              steps: int | None = None, device: str | None = None, seed: int = 0,
              upsample: int = 1, progress: Progress | None = None, log: Log | None = None,
              cancel=None) -> FitReport:
    """Fit a model on every plane of the given TIFF files and save it to ``out``.

    ``upsample`` runs the backbone on images up-sampled by that factor
    (:attr:`~napari_stego.features.FeatureConfig.upsample`), for thin structures.

    Unreadable, unsupported and blank (all-NaN / constant) inputs are left out with a
    one-line message; the fit uses the rest.

    Raises:
        StegoError: no usable image, or what :meth:`StegoModel.fit` raises.
        Cancelled: ``cancel`` was set.
    """
    from ..model import StegoModel

    say = log or (lambda msg: None)
    check_model_out(Path(out))  # before the work, not after it
    files, problems = expand_inputs(inputs)
    for p in problems:
        say(f"failed: {p.line()}")
    images: list[np.ndarray] = []
    results = list(problems)
    for path in files:
        try:
            planes = read_planes(path)
        except StegoError as exc:
            results.append(FileResult(str(path), "failed", str(exc)))
            say(f"failed: {results[-1].line()}")
            continue
        usable = [p for p in planes if _blank_reason(p) is None]
        if not usable:
            results.append(FileResult(str(path), "skipped",
                                      f"{_blank_reason(planes[0])}: nothing to learn from"))
            say(f"skipped: {results[-1].line()}")
            continue
        images.extend(usable)
        results.append(FileResult(str(path), "used", planes=len(usable),
                                  pixels=sum(p.shape[0] * p.shape[1] for p in usable)))
    if not images:
        raise StegoError("no usable images to fit on: " + (
            "; ".join(r.line() for r in results) or "no inputs given"))
    out = Path(out)
    from ..features import FeatureConfig

    model = StegoModel.fit(images, n_clusters, backbone=backbone, weights=weights, steps=steps,
                           device=device, seed=seed, features=FeatureConfig(upsample=upsample),
                           progress=progress, cancel=cancel)
    model.info["fitted_on"] = [r.input for r in results if r.status == "used"]
    try:
        path = model.save(out)
    except Exception as exc:  # OSError, or safetensors' own error for the same causes
        remove_model_partials(out)
        raise StegoError(f"cannot write the model to {out}: "
                         f"{_short(getattr(exc, 'strerror', None) or exc)}") from None
    return FitReport(str(path), results, len(images), list(model.info.get("warnings", [])))
