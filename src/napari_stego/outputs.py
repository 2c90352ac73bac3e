"""What is already at a ``segment`` output's name, and whether the job may replace it.

The rule: only napari-stego's own outputs may be replaced or removed without ``overwrite``
-- a path whose metadata says ``written_by: napari-stego segment`` (TIFF description or
zarr attribute ``napari_stego``), or napari-stego's hidden temporary names
(``.<name>.<random>.partial``, ``.napari-stego-work/``). Anything else at an output's name
is *in the way*: that input fails with a message naming it. With ``overwrite`` the user
allows replacing files, but a folder that is not a napari-stego zarr output is never
deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .io import META_KEY

WRITTEN_BY = "napari-stego segment"

# states of an output name; see :func:`check_output`
MISSING, VALID, REDO, BLOCKED = "missing", "valid", "redo", "blocked"


def _short(exc: BaseException, limit: int = 80) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(meta, *keys):
    """``meta[k0][k1]...``, or ``None`` where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(meta, dict):
            return None
        meta = meta.get(key)
    return meta


def _own(meta) -> dict | None:
    """The metadata block if it is napari-stego segment's (a dict saying so), else ``None``."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    if isinstance(meta, dict) and meta.get("written_by") == WRITTEN_BY:
        return meta
    return None


def _read_tiff(path: Path) -> tuple[dict | None, str | None, tuple, np.dtype | None]:
    """``(own metadata or None, damage or None, shape, dtype)`` of a TIFF output."""
    import tifffile

    from .labels import read_own_metadata

    with tifffile.TiffFile(str(path)) as tif:
        meta = _own(read_own_metadata(tif))
        if meta is None:
            return None, None, (), None
        try:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            last = tif.pages[len(tif.pages) - 1]
            ends = [o + n for o, n in zip(last.dataoffsets, last.databytecounts)]
        except Exception as exc:
            return meta, f"existing output is unreadable ({_short(exc)})", (), None
        # the last plane's bytes are all in the file: not truncated (checked without decoding
        # it, which for a whole-slide label plane would cost gigabytes)
        if not ends or max(ends) > os.path.getsize(path):
            return meta, "existing output is cut short (the file ends inside its last plane)", \
                shape, dtype
    return meta, None, shape, dtype


def _read_zarr(path: Path) -> tuple[dict | None, str | None, tuple, np.dtype | None]:
    import zarr

    node = zarr.open(str(path), mode="r")
    if hasattr(node, "shape"):
        arr, attrs = node, node.attrs
    else:  # an OME-Zarr output: a group with level 0 as array "0"
        attrs = node.attrs
        arr = node["0"] if "0" in node else None
    meta = _own(dict(attrs).get(META_KEY))
    if arr is None:
        meta = None
    if meta is None:
        return None, None, (), None
    try:
        if arr.ndim:
            np.asarray(arr[tuple(s - 1 for s in arr.shape)])  # the last chunk reads
    except Exception as exc:
        return meta, f"existing output is unreadable ({_short(exc)})", (), None
    return meta, None, tuple(arr.shape), np.dtype(arr.dtype)


def check_output(path: Path, expected: dict, fmt: str, overwrite: bool) -> tuple[str, str]:
    """``(state, reason)`` of the output name ``path`` for an output described by
    ``expected`` (the metadata it would get, with ``shape`` and ``dtype``):

    - ``"missing"``: nothing there;
    - ``"valid"``: napari-stego's finished output of this input, model and settings (keep);
    - ``"redo"``: napari-stego's output, but incomplete, damaged or of an input that changed
      since (or anything replaceable, with ``overwrite``): write it anew;
    - ``"blocked"``: not napari-stego's output, another input's (a name clash), or made with
      another model or settings: this input fails with ``reason``.
    """
    if not os.path.lexists(path):
        return MISSING, ""
    hint = "pass overwrite (--overwrite) to replace it, or choose another output folder"
    if path.is_symlink():
        return BLOCKED, f"{path} is a symbolic link, not a napari-stego output: {hint}"
    want_dir = fmt in ("zarr", "ome-zarr")
    if path.is_dir() != want_dir:
        kind = "a folder" if path.is_dir() else "a file"
        if path.is_dir():  # never deleted, not even with overwrite
            return BLOCKED, (f"{path} is {kind}, not a napari-stego output: move or rename it, "
                             "or choose another output folder")
        return (REDO, "") if overwrite else (
            BLOCKED, f"{path} is {kind}, not a napari-stego output: {hint}")
    try:
        meta, damage, shape, dtype = (_read_zarr if want_dir else _read_tiff)(path)
    except Exception as exc:
        meta, damage, shape, dtype = None, None, (), None
        foreign = f"{path} exists and is not a napari-stego output (cannot read it as one: " \
                  f"{_short(exc)})"
    else:
        foreign = f"{path} exists and was not written by napari-stego segment"
    if meta is None:
        if want_dir:  # someone's folder (an OME-Zarr, ...): never deleted
            return BLOCKED, f"{foreign}: move or rename it, or choose another output folder"
        return (REDO, "") if overwrite else (BLOCKED, f"{foreign}: {hint}")
    if overwrite:
        return REDO, ""
    theirs = _get(meta, "input", "path")
    if theirs != expected["input"]["path"]:
        return BLOCKED, (f"name clash: {path} was made from another input ({theirs}): {hint}, "
                         "or segment this input into another output folder")
    from .labels import is_current

    if not is_current(meta):  # 0-based labels of an older napari-stego: made again
        return REDO, ("existing output holds 0-based labels (an older napari-stego); "
                      "rewritten with cluster ids 1..K")
    if (_get(meta, "model", "sha256"), meta.get("settings")) != (
            expected["model"]["sha256"], expected["settings"]):
        return BLOCKED, f"{path} exists, made with another model or settings: {hint}"
    if damage:
        return REDO, damage
    if _get(meta, "input", "signature") != expected["input"]["signature"]:
        return REDO, "input changed since its output was written"
    if tuple(shape) != tuple(expected["shape"]) or dtype != np.dtype(expected["dtype"]):
        return REDO, (f"existing output has shape {tuple(shape)} {dtype}, expected "
                      f"{tuple(expected['shape'])} {np.dtype(expected['dtype'])}")
    if not meta.get("complete"):
        return REDO, "existing output is incomplete"
    return VALID, ""


def check_model_out(out: Path) -> None:
    """Before a fit: ``out`` can receive the model file (else :class:`StegoError`).

    Refuses a folder and a place that cannot be written (a missing parent that cannot be
    made, a read-only folder, a parent that is a file), probing with a hidden temporary
    file that is removed at once -- so no fit is done for nothing.
    """
    import uuid

    from .errors import StegoError

    out = Path(out)
    if out.is_dir():
        raise StegoError(f"--out {out} is a folder: give the model file's name, e.g. "
                         f"{out / 'model.stego'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise StegoError(f"cannot write the model to {out}: "
                         f"{(exc.strerror or str(exc)).lower()}") from None


def remove_model_partials(out: Path) -> None:
    """Remove the temporaries a failed model save left next to ``out``."""
    import contextlib
    import glob as _glob

    out = Path(out)
    for p in (out.with_name(out.name + ".partial"),
              *map(Path, _glob.glob(str(out.parent / f".{_glob.escape(out.name)}.*.partial")))):
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()
