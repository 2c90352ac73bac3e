"""OME-Zarr (OME-NGFF) outputs: labels / probabilities with axes, scale and a pyramid.

The batch job streams level 0 (full resolution) into the array ``0`` of a zarr v3 group
(plane by plane or tile by tile, as for ``--format zarr``); :func:`finish` then adds the
down-sampled levels of a multiscale pyramid for big planes (every second pixel per level,
which keeps label ids intact, until the longer side is at most :data:`PYRAMID_SIDE`) and
writes the NGFF metadata (axes with their types and units, one ``scale`` per level) through
the ``ome-zarr`` library, plus napari-stego's own block (:data:`~napari_stego.io.META_KEY`).
``ome_zarr.reader`` and NGFF viewers (napari with napari-ome-zarr, Fiji's MoBIE, vizarr,
neuroglancer) open it with its physical scale.
"""

from __future__ import annotations

from pathlib import Path

from .errors import StegoError
from .io import META_KEY

PYRAMID_SIDE = 1024
_UNITS = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "nm": "nanometer",
          "mm": "millimeter", "m": "meter", "s": "second", "ms": "millisecond"}
_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}


def require() -> None:
    """Raise a one-line :class:`StegoError` when the ``ome-zarr`` package is missing."""
    try:
        import ome_zarr.writer  # noqa: F401
    except ImportError:
        raise StegoError("--format ome-zarr needs the ome-zarr package: pip install ome-zarr "
                         "(or pip install 'napari-stego[ome]')") from None


def pyramid_factors(shape2d: tuple[int, int], side: int = PYRAMID_SIDE) -> list[int]:
    """Down-sampling factors of the extra levels (2, 4, ...): none for planes whose longer
    side is at most ``side``."""
    factors, f = [], 2
    while max(shape2d) / (f // 2) > side:
        factors.append(f)
        f *= 2
    return factors


def axes_metadata(axes: str, unit: str | None) -> list[dict]:
    """NGFF ``axes``: lower-case names, types (time / channel / space) and, for spatial
    axes, the unit (``None``: none given)."""
    out = []
    ngff_unit = _UNITS.get(unit, unit) if unit else None
    for a in axes:
        entry: dict = {"name": a.lower()}
        if a in _TYPES:
            entry["type"] = _TYPES[a]
            if entry["type"] == "space" and ngff_unit:
                entry["unit"] = ngff_unit
        out.append(entry)
    return out


def finish(path: str | Path, meta: dict) -> None:
    """Turn a zarr v3 group holding level 0 as array ``0`` into an OME-NGFF multiscale
    image: pyramid levels, NGFF metadata from ``meta``'s ``axes`` / ``scale`` / ``unit``
    (:func:`napari_stego.labels.label_metadata`), and ``meta`` itself."""
    import dask.array as da
    import zarr
    from ome_zarr.format import CurrentFormat
    from ome_zarr.writer import write_multiscales_metadata

    group = zarr.open_group(str(path), mode="r+")
    level0 = group["0"]
    shape = tuple(level0.shape)
    axes = meta.get("axes") or ""
    scale = list(meta.get("scale") or [])
    if len(axes) != len(shape) or len(scale) != len(shape):
        axes, scale = "".join("TZQIN"[i] for i in range(len(shape) - 2)) + "YX", \
            [1.0] * len(shape)
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                             "scale": scale}]}]
    lazy = da.from_zarr(level0)
    for level, f in enumerate(pyramid_factors(shape[-2:]), 1):
        small = lazy[..., ::f, ::f]
        chunks = tuple(min(c, s) for c, s in zip(level0.chunks, small.shape))
        arr = group.create_array(str(level), shape=small.shape, dtype=level0.dtype,
                                 chunks=chunks, fill_value=0)
        da.store(small.rechunk(chunks), arr, lock=False, scheduler="synchronous")
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [*scale[:-2], scale[-2] * f, scale[-1] * f]}]})
    write_multiscales_metadata(group, datasets, fmt=CurrentFormat(),
                               axes=axes_metadata(axes, meta.get("unit")),
                               name=str(meta.get("layer_name") or Path(path).stem))
    group.attrs[META_KEY] = meta
