"""napari reader: TIFF / OME-TIFF / ImageJ stacks, opened lazily.

The pixels stay on disk: ``tifffile``'s zarr view of the file is wrapped in a dask array,
so a 20 GB stack opens at once and napari reads only the planes it shows (pyramidal
OME-TIFFs open as multiscale layers). The channel axis comes from the metadata (OME
``DimensionOrder`` / ImageJ hyperstack axes: ``C``, or a non-RGB sample axis ``S``) and
channels become separate layers, named from the OME channel names when present; RGB(A)
files open as RGB. Pixel sizes (OME ``PhysicalSize*``, ImageJ spacing / resolution) become
the layer scale. Label files written by napari-stego's writer open as Labels layers with
their metadata back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io import META_KEY

SUFFIXES = (".tif", ".tiff")


def napari_get_reader(path):
    """The reader for ``path`` if it is a readable TIFF (or a list of them), else ``None``.

    Never raises: a file this reader cannot open is left to other readers.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths or not all(str(p).lower().endswith(SUFFIXES) for p in paths):
        return None
    try:
        import tifffile

        from .tiffcheck import claimed_size_problem

        for p in paths:
            with tifffile.TiffFile(p) as tif:
                if not tif.series or claimed_size_problem(tif.series[0], p):
                    return None  # no image, or a header claiming more than the file holds
    except Exception:
        return None
    return read_tiff


def read_tiff(path) -> list[tuple]:
    """``[(data, add_kwargs, layer_type), ...]`` for one path or a list of paths."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[tuple] = []
    for p in paths:
        out.extend(_read_one(Path(p)))
    return out


def _lazy_levels(path: Path) -> list:
    """Dask arrays of the first series, one per pyramid level, backed by the file."""
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(str(path), aszarr=True, series=0)
    group = zarr.open(store, mode="r")
    if hasattr(group, "shape"):  # one level
        return [da.from_zarr(group)]
    keys = sorted((k for k in group.array_keys()), key=lambda k: int(k) if k.isdigit() else k)
    return [da.from_zarr(group[k]) for k in keys]


def _read_one(path: Path) -> list[tuple]:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        axes = series.axes.upper()
        shape = tuple(series.shape)
        ours = _our_metadata(tif)
        channel_names = _ome_channel_names(tif) if tif.is_ome else []
        sizes = _pixel_sizes(tif, axes)
    levels = _lazy_levels(path)
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if ours is not None:  # labels written by napari-stego: back as a Labels layer
        layer_name = ours.get("layer_name")
        kwargs = dict(name=layer_name if isinstance(layer_name, str) else name,
                      metadata={META_KEY: ours})
        scale = ours.get("scale")
        if (isinstance(scale, list) and len(scale) == len(shape)
                and all(isinstance(v, (int, float)) and v > 0 for v in scale)):
            kwargs["scale"] = tuple(scale)
        data = levels[0] if len(levels) == 1 else levels
        return [(data, kwargs, "labels")]

    kwargs: dict = dict(name=name, multiscale=len(levels) > 1)
    rgb = axes.endswith("S") and shape[-1] in (3, 4)
    channel_axis = None
    if "C" in axes and shape[axes.index("C")] > 1:
        channel_axis = axes.index("C")
    elif axes.endswith("S") and not rgb and shape[-1] > 1:
        channel_axis = len(axes) - 1
    last = len(axes) - 1
    spatial = [a for i, a in enumerate(axes) if i != channel_axis and not (rgb and i == last)]
    scale = [sizes.get(a, 1.0) for a in spatial]
    if any(s != 1.0 for s in scale):
        kwargs["scale"] = tuple(scale)
    kwargs["axis_labels"] = tuple(spatial)
    if rgb:
        kwargs["rgb"] = True
    if channel_axis is not None:
        n = shape[channel_axis]
        kwargs["channel_axis"] = channel_axis
        names = channel_names if len(channel_names) == n else [f"{name} ch{c}" for c in range(n)]
        kwargs["name"] = [f"{name} {c}" if len(channel_names) == n else c for c in names]
        kwargs["blending"] = "additive"
    data = levels[0] if len(levels) == 1 else levels
    return [(data, kwargs, "image")]


def _our_metadata(tif) -> dict | None:
    """napari-stego's metadata stored by :mod:`napari_stego._writer`, or ``None``."""
    try:
        meta = tif.shaped_metadata
    except Exception:
        meta = None
    if not meta:
        return None
    raw = meta[0].get(META_KEY) if isinstance(meta[0], dict) else None
    if raw is None:
        return None
    try:
        ours = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    return ours if isinstance(ours, dict) else None  # a list, a number: not ours


def _ome_channel_names(tif) -> list[str]:
    try:
        import tifffile

        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
        image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
        chans = image["Pixels"].get("Channel", [])
        chans = chans if isinstance(chans, list) else [chans]
        return [str(c.get("Name", f"ch{i}")) for i, c in enumerate(chans)]
    except Exception:
        return []


def _pixel_sizes(tif, axes: str) -> dict:
    """Axis -> physical pixel size from OME or ImageJ metadata (missing axes: 1)."""
    sizes: dict = {}
    try:
        if tif.is_ome:
            import tifffile

            ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
            image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
            pixels = image["Pixels"]
            for a in "XYZ":
                if f"PhysicalSize{a}" in pixels:
                    sizes[a] = float(pixels[f"PhysicalSize{a}"])
        elif tif.is_imagej:
            ij = tif.imagej_metadata or {}
            if "spacing" in ij:
                sizes["Z"] = float(ij["spacing"])
            page = tif.pages.first
            for a, tag in (("X", "XResolution"), ("Y", "YResolution")):
                if tag in page.tags:
                    num, den = page.tags[tag].value
                    if num:
                        sizes[a] = den / num
    except Exception:
        return {}
    return {k: v for k, v in sizes.items() if np.isfinite(v) and v > 0}
