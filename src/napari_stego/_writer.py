"""napari writer: Labels layers to compressed TIFF, with what made them in the metadata.

The smallest unsigned type that holds the labels is used (uint8, uint16, else uint32);
planes are written one by one (zlib-compressed), so a lazy (dask) layer is never loaded
whole. The layer's ``metadata['napari_stego']`` (model, K, CRF settings, ...) plus its
name and scale are stored as JSON in the TIFF description; napari-stego's reader gives
them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .io import META_KEY


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


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer to ``path`` (a ``.tif`` / ``.tiff``); returns ``[path]``."""
    import tifffile

    path = str(path)
    if not path.lower().endswith((".tif", ".tiff")):
        path += ".tif"
    if isinstance(data, list):  # multiscale labels: the full resolution
        data = data[0]
    dtype = _dtype_for(data)
    ours = dict(meta.get("metadata", {}).get(META_KEY) or {})
    ours = _jsonable(ours)
    ours["layer_name"] = meta.get("name", Path(path).stem)
    if meta.get("scale") is not None:
        ours["scale"] = [float(s) for s in meta["scale"]]
    ours.setdefault("written_by", "napari-stego writer")
    shape = tuple(data.shape)
    if len(shape) > 2:
        pages = (np.asarray(data[idx]).astype(dtype) for idx in np.ndindex(*shape[:-2]))
    else:
        pages = np.asarray(data).astype(dtype)
    tifffile.imwrite(path, pages, shape=shape, dtype=dtype, compression="zlib",
                     photometric="minisblack", metadata={META_KEY: json.dumps(ours)})
    return [path]
