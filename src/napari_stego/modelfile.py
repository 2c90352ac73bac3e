"""The ``.stego`` model file: written atomically with the user's umask, checked fully on read.

A model file is a safetensors file (no code runs on load) with the model's settings as JSON
under one metadata key. :func:`read_model_file` checks every field and tensor before anything
is built from them, so that a damaged or hand-edited file fails at load with one
:class:`~napari_stego.errors.StegoError` saying what is wrong, not later on every image (or
silently, with NaN centroids giving all-zero labels). :func:`model_configs` builds each
stage's config from it, with the values that files written before a setting existed must
load with (so an old model predicts as it did, not with today's defaults).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path

import torch

from .appearance import AppearanceConfig, ColourSpace
from .cluster import ClusterConfig
from .errors import StegoError
from .features import FeatureConfig
from .intensity import IntensityConfig
from .io import META_KEY
from .loss import LossConfig
from .predict import PredictConfig
from .shifts import AutoShiftConfig
from .tiling import TileConfig
from .train import TrainConfig

_REQUIRED = dict(format_version=int, backbone=str, weights_source=str,
                 weights_fingerprint=str, in_dim=int, code_dim=int, n_clusters=int,
                 feature_config=dict, train_config=dict, cluster_config=dict,
                 predict_config=dict)
_OPTIONAL = dict(package_version=str, tile_config=dict, info=dict, colour_space=dict)


def write_model_file(path: Path, tensors: dict, metadata: dict) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` via a temporary file and a rename.

    The file is created like any other file the user writes (``open``: mode 0666 less the
    umask), not with the private 0600 of a temporary file, so colleagues can read a shared
    model where the umask allows it.
    """
    from safetensors.torch import save

    data = save(tensors, metadata={META_KEY: json.dumps(metadata)})
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_model_file(path: Path, max_version: int) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a model file, every field checked.

    Raises:
        StegoError: not a safetensors file with napari-stego metadata, a newer format, or
            any missing, extra, mistyped or non-finite field or tensor.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise StegoError(f"{path} is not a napari-stego model file ({_one_line(exc)})") from None
    if raw is None:
        raise StegoError(f"{path} is not a napari-stego model file (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise StegoError(f"{path} is damaged: its settings are not valid JSON ({exc})") from None
    _check_meta(meta, path, max_version)
    _check_tensors(tensors, meta, path)
    return meta, tensors


def _damaged(path, what: str) -> StegoError:
    return StegoError(f"{path} is a damaged model file: {what}")


def _check_meta(meta, path, max_version: int) -> None:
    if not isinstance(meta, dict):
        raise _damaged(path, f"its settings are a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > max_version:
        raise StegoError(f"{path} was written by napari-stego {meta.get('package_version')}, "
                         f"which is newer than this one: upgrade napari-stego")
    for key, kind in _REQUIRED.items():
        if key not in meta:
            raise _damaged(path, f"'{key}' is missing")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        value = meta.get(key)
        if key in _OPTIONAL and value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _damaged(path, f"'{key}' should be a {_KIND[kind]}, got {value!r:.60}")
    extra = sorted(set(meta) - set(_REQUIRED) - set(_OPTIONAL))
    if extra:
        raise _damaged(path, f"unknown setting(s) {', '.join(extra)}")
    if meta["format_version"] < 1:
        raise _damaged(path, f"format_version {meta['format_version']} is not valid")
    for key in ("in_dim", "code_dim", "n_clusters"):
        if meta[key] < 1:
            raise _damaged(path, f"'{key}' must be a positive integer, got {meta[key]}")


_KIND = {int: "whole number", str: "string", dict: "JSON object"}


def _check_tensors(tensors: dict, meta: dict, path) -> None:
    k, code, in_dim = meta["n_clusters"], meta["code_dim"], meta["in_dim"]
    if "centroids" not in tensors:
        raise _damaged(path, "the 'centroids' tensor is missing")
    expected = {"centroids": (k, code), "head.linear.weight": (code, in_dim, 1, 1),
                "head.linear.bias": (code,), "head.nonlinear.0.weight": (in_dim, in_dim, 1, 1),
                "head.nonlinear.0.bias": (in_dim,), "head.nonlinear.2.weight": (code, in_dim, 1, 1),
                "head.nonlinear.2.bias": (code,)}
    space = meta.get("colour_space")
    if space is not None:  # a model that clusters the codes with the cells' colours
        m = space.get("n_fourier")
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise _damaged(path, f"colour_space has a bad n_fourier {m!r}")
        expected["colour_centroids"] = (k, m)
    for name, t in tensors.items():
        if name not in expected:
            raise _damaged(path, f"unexpected tensor '{name}'")
    for name, shape in expected.items():
        if name not in tensors:
            raise _damaged(path, f"the '{name}' tensor is missing")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise _damaged(path, f"'{name}' has shape {tuple(t.shape)}, expected {shape} "
                                 f"(n_clusters {k}, code_dim {code}, in_dim {in_dim})")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise _damaged(path, f"'{name}' holds non-finite or non-float values")
    if (tensors["centroids"].norm(dim=1) == 0).any():
        raise _damaged(path, "a centroid is all zeros")


def build_configs(meta: dict, path, builders: dict) -> dict:
    """Each ``*_config`` of ``meta`` built with ``builders[key](dict)``; any error (unknown
    key, wrong type, invalid value) becomes one :class:`StegoError` naming the setting."""
    out = {}
    for key, build in builders.items():
        value = meta.get(key)
        if value is None:
            value = {}
        try:
            out[key] = build(value)
        except StegoError as exc:
            raise _damaged(path, f"{key}: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise _damaged(path, f"{key} is not valid ({_one_line(exc)})") from None
    return out


def strict(cls, d: dict):
    """``cls(**d)`` for a dataclass, refusing keys it does not have and non-finite floats."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise TypeError(f"unknown key(s) {', '.join(extra)}")
    for key, value in d.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} is {value}")
    return cls(**d)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def model_configs(meta: dict, path) -> dict:
    """The stages' configs of a model file's ``meta`` (see :func:`build_configs`)."""
    return build_configs(meta, path, dict(
        feature_config=_feature_config, train_config=_train_config,
        # files from before the refinement existed were not refined, from before colour
        # clustering clustered the codes alone, and from before the Lloyd passes kept the
        # mini-batch k-means result
        cluster_config=lambda d: strict(ClusterConfig, {"refine": False, "colour": False,
                                                        "lloyd_iter": 0, **d}),
        # and from before the guided up-sampling up-sampled the codes bilinearly
        predict_config=lambda d: strict(PredictConfig, {"guide": None, **d}),
        tile_config=lambda d: strict(TileConfig, d)))


def model_colour_space(meta: dict, path) -> ColourSpace | None:
    """The :class:`~napari_stego.appearance.ColourSpace` of a model file, or ``None``."""
    d = meta.get("colour_space")
    if d is None:
        return None
    try:
        return strict(ColourSpace, d)
    except (StegoError, TypeError, ValueError) as exc:
        raise StegoError(f"{path} is a damaged model file: bad colour_space ({exc})") from None


def _feature_config(d: dict) -> FeatureConfig:
    d = dict(d)
    # files from before the dim-uint8 rule divided every uint8 image by 255
    inten = {"dim_uint8": None, **d.pop("intensity")}
    channels = inten.get("channels")
    if isinstance(channels, list):
        inten["channels"] = tuple(channels)
    inten["percentiles"] = tuple(inten["percentiles"])
    return strict(FeatureConfig, dict(d, intensity=strict(IntensityConfig, inten)))


def _train_config(d: dict) -> TrainConfig:
    d = {"ema_span": None, **d}  # files from before the weights' average kept the last ones
    d["loss"] = strict(LossConfig, d["loss"])
    if isinstance(d.get("appearance"), dict):
        d["appearance"] = strict(AppearanceConfig, d["appearance"])
    if d.get("auto_shifts") is not None:
        # files from before the regions' rule: one fraction; from before its speckle end:
        # ``self_attract`` where the features' groups speckle
        d["auto_shifts"] = strict(AutoShiftConfig, {"region_self_attract": None,
                                                    "speckle_self_attract": None,
                                                    **d["auto_shifts"]})
    return strict(TrainConfig, d)
