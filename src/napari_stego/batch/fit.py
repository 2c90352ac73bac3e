"""``fit_files``: fit a model on TIFF files, each one a source (its own axes, one intensity
mapping per stack, features through the cache)."""

from __future__ import annotations

import os
from pathlib import Path


from ..errors import StegoError
from ..outputs import check_model_out, remove_model_partials
from .inputs import _blank_reason, _inspect, _short, expand_inputs
from .reports import FileResult, FitReport, Log, Progress


def parse_channels(text: str | None):
    """``--channels``: ``None``, ``"pca"`` or three comma-separated channel indices."""
    if text is None or text == "":
        return None
    if text.strip().lower() == "pca":
        return "pca"
    try:
        picks = tuple(int(c) for c in text.split(","))
    except ValueError:
        picks = ()
    if len(picks) != 3 or min(picks) < 0:
        raise StegoError(f"--channels takes 'pca' or three channel indices such as 0,1,1; got "
                         f"{text!r}")
    return picks


def _blank(path: Path) -> str | None:
    """Why a file has nothing to learn from (all NaN / constant, judged on the pixels the
    intensity statistics read), or ``None``."""
    from ..io import open_image, sample_pixels

    values = sample_pixels(open_image(path))
    return _blank_reason(values.reshape(-1))


def fit_files(inputs, out: str | os.PathLike, *, n_clusters: int,
              backbone: str = "dino_vits8", weights: str | os.PathLike | None = None,
              steps: int | None = None, device: str | None = None, seed: int = 0,
              upsample: int = 1, channels=None, tile: int | None = None, cache=None,
              progress: Progress | None = None, log: Log | None = None,
              cancel=None) -> FitReport:
    """Fit a model on the given TIFF files and save it to ``out``.

    Each file is one source with its own axes (:func:`~napari_stego.io.open_image`), as
    ``StegoModel.fit`` takes them from Python: one intensity mapping per stack, features
    through the cache (``cache``: as for ``StegoModel.fit``), every plane used.

    ``upsample`` runs the backbone on images up-sampled by that factor
    (:attr:`~napari_stego.features.FeatureConfig.upsample`), for thin structures.
    ``channels`` (``None``, ``"pca"`` or three indices, :class:`~napari_stego.io.
    IntensityConfig`) maps multichannel files (2-4 fluorescence channels) to the backbone's
    RGB; it is stored in the model and used by every later segmentation. ``tile``: the
    tile side in pixels (:class:`~napari_stego.tiling.TileConfig`, stored in the model).

    Unreadable, unsupported and blank (all-NaN / constant) inputs are left out with a
    one-line message; the fit uses the rest.

    Raises:
        StegoError: no usable image, or what :meth:`StegoModel.fit` raises.
        Cancelled: ``cancel`` was set.
    """
    from ..features import FeatureConfig
    from ..io import IntensityConfig
    from ..model import StegoModel
    from ..tiling import TileConfig
    from .plan import _channel_problem

    say = log or (lambda msg: None)
    check_model_out(Path(out))  # before the work, not after it
    if isinstance(channels, str) and channels != "pca":
        channels = parse_channels(channels)
    intensity = IntensityConfig(channels=channels)
    files, problems = expand_inputs(inputs)
    for p in problems:
        say(f"failed: {p.line()}")
    sources: list[Path] = []
    results = list(problems)
    n_planes = 0
    for path in files:
        try:
            layout = _inspect(path)
            problem = _channel_problem(layout, intensity)
            if problem:
                raise StegoError(problem.replace("the model maps none of them to RGB: fit it "
                                                 "with", "none is mapped to RGB: pass"))
            try:
                blank = _blank(path)
            except StegoError:
                raise
            except Exception as exc:
                raise StegoError(f"cannot read pixels: truncated or corrupt TIFF "
                                 f"({_short(exc)})") from None
        except StegoError as exc:
            results.append(FileResult(str(path), "failed", str(exc)))
            say(f"failed: {results[-1].line()}")
            continue
        if blank:
            results.append(FileResult(str(path), "skipped", f"{blank}: nothing to learn from"))
            say(f"skipped: {results[-1].line()}")
            continue
        sources.append(path)
        h, w = layout.plane_shape
        n_planes += layout.n_planes
        results.append(FileResult(str(path), "used", planes=layout.n_planes,
                                  pixels=layout.n_planes * h * w))
    if not sources:
        raise StegoError("no usable images to fit on: " + (
            "; ".join(r.line() for r in results) or "no inputs given"))
    out = Path(out)
    tiles = TileConfig() if tile is None else TileConfig(tile=int(tile))
    model = StegoModel.fit([str(p) for p in sources], n_clusters, backbone=backbone,
                           weights=weights, steps=steps, device=device, seed=seed,
                           features=FeatureConfig(upsample=upsample, intensity=intensity),
                           tiles=tiles, cache=cache, progress=progress, cancel=cancel)
    model.info["fitted_on"] = [r.input for r in results if r.status == "used"]
    try:
        path = model.save(out)
    except Exception as exc:  # OSError, or safetensors' own error for the same causes
        remove_model_partials(out)
        raise StegoError(f"cannot write the model to {out}: "
                         f"{_short(getattr(exc, 'strerror', None) or exc)}") from None
    return FitReport(str(path), results, n_planes, list(model.info.get("warnings", [])))


__all__ = ["fit_files", "parse_channels"]
