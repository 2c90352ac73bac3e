"""napari writer: Labels layers to compressed TIFF, with what made them in the metadata.

napari-stego's own layers (ids 1..K, :mod:`napari_stego.labels`) are written in the
model's labels dtype; other Labels layers in the smallest unsigned type that holds them
(uint8, uint16, else uint32). Planes are written one by one (zlib-compressed), so a lazy
(dask) layer is never loaded whole. The layer's axes, scale and units become ImageJ /
TIFF metadata that Fiji and tifffile read; its ``metadata['napari_stego']`` plus its name,
scale, axes, units and colormap are stored as JSON in the description, and napari-stego's
reader gives them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io import META_KEY
from .labels import labels_dtype, tiff_kwargs


def _dtype_for(data) -> np.dtype:
    top = int(np.asarray(data.max()))
    low = int(np.asarray(data.min()))
    if low < 0:
        return np.dtype(np.int32)
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _named(meta: dict, ndim: int) -> bool:
    """Whether the layer's axis labels are axis letters (napari's default is ``-1``...)."""
    labels = [str(a).upper() for a in (meta.get("axis_labels") or ())]
    return len(labels) == ndim and all(len(a) == 1 and a.isalpha() for a in labels) \
        and len(set(labels)) == ndim


def _axes(meta: dict, ndim: int) -> str:
    if _named(meta, ndim):
        return "".join(str(a).upper() for a in meta["axis_labels"])
    return {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "")


def _unit(meta: dict) -> str | None:
    units = [str(u) for u in (meta.get("units") or ())]
    units = [u for u in units if u not in ("pixel", "")]
    if not units:
        return None
    return "µm" if units[-1] in ("micrometer", "micron", "um") else units[-1]


def _colormap(cmap) -> dict | None:
    """A JSON form of a labels colormap (the reader restores it)."""
    if cmap is None:
        return None
    name = type(cmap).__name__
    try:
        if name == "DirectLabelColormap":
            return {"direct": {str(k): np.asarray(v, float).tolist()
                               for k, v in cmap.color_dict.items()}}
        if name == "CyclicLabelColormap":
            return {"cyclic": {"colors": np.asarray(cmap.colors, float).tolist(),
                               "seed": float(cmap.seed)}}
    except Exception:
        return None
    return None


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer to ``path`` (a ``.tif`` / ``.tiff``); returns ``[path]``."""
    import tifffile

    from .batch.writes import _atomic_write

    path = str(path)
    if not path.lower().endswith((".tif", ".tiff")):
        path += ".tif"
    if isinstance(data, list):  # multiscale labels: the full resolution
        data = data[0]
    ours = _jsonable(dict(meta.get("metadata", {}).get(META_KEY) or {}))
    k = ours.get("n_clusters")
    dtype = labels_dtype(k) if isinstance(k, int) and k > 0 and \
        int(np.asarray(data.max())) <= k else _dtype_for(data)
    shape = tuple(data.shape)
    ours["layer_name"] = meta.get("name", Path(path).stem)
    own = ours.get("axes")  # what napari-stego recorded, when the layer names no axes
    axes = _axes(meta, len(shape))
    if not _named(meta, len(shape)) and isinstance(own, str) and len(own) == len(shape):
        axes = own
    ours["axes"] = axes
    if meta.get("scale") is not None:
        ours["scale"] = [float(s) for s in meta["scale"]]
    ours["unit"] = _unit(meta) or ours.get("unit")
    colormap = _colormap(meta.get("colormap"))
    if colormap is not None:
        ours["colormap"] = colormap
    ours.setdefault("written_by", "napari-stego writer")
    if len(shape) > 2:
        pages = (np.asarray(data[idx]).astype(dtype) for idx in np.ndindex(*shape[:-2]))
    else:
        pages = np.asarray(data).astype(dtype)
    # under a temporary name, renamed when complete (a plane of a lazy layer failing
    # half-way leaves no half-written file and the earlier one whole)
    _atomic_write(Path(path), lambda tmp: tifffile.imwrite(
        str(tmp), pages, shape=shape, dtype=dtype, **tiff_kwargs(shape, dtype, ours)))
    return [path]
