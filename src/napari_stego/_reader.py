"""napari reader: TIFF / OME-TIFF / ImageJ stacks, opened lazily.

The pixels stay on disk: ``tifffile``'s zarr view of the file is wrapped in a dask array,
so a 20 GB stack opens at once and napari reads only the planes it shows (pyramidal
OME-TIFFs open as multiscale layers). The channel axis comes from the metadata (OME
``DimensionOrder`` / ImageJ hyperstack axes: ``C``, or a non-RGB sample axis ``S``) and
channels become separate layers, named from the OME channel names when present; RGB(A)
files open as RGB. Pixel sizes (OME ``PhysicalSize*``, ImageJ spacing / resolution) become
the layer scale. Label files written by napari-stego (the writer, the CLI, the demo) open
as Labels layers with their name, scale, axes, units, colormap and metadata back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import META_KEY
from .labels import pixel_sizes, read_own_metadata

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
        ours = read_own_metadata(tif)
        channel_names = _ome_channel_names(tif) if tif.is_ome else []
        sizes, unit = pixel_sizes(tif, axes)
    levels = _lazy_levels(path)
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if ours is not None:  # labels written by napari-stego: back as a Labels layer
        data = levels[0] if len(levels) == 1 else levels
        return [(data, _labels_kwargs(ours, name, axes, shape, sizes, unit), "labels")]

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
    if unit and "scale" in kwargs:
        kwargs["units"] = tuple(unit if a in sizes else "pixel" for a in spatial)
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


def _labels_kwargs(ours: dict, name: str, axes: str, shape: tuple, sizes: dict,
                   unit: str | None) -> dict:
    """Labels layer keywords from napari-stego's metadata: name, scale, axes, units and
    colormap as written (:mod:`napari_stego.labels`), falling back to the file's own."""
    layer_name = ours.get("layer_name")
    kwargs: dict = dict(name=layer_name if isinstance(layer_name, str) else name,
                        metadata={META_KEY: ours})
    own_axes = ours.get("axes")
    if isinstance(own_axes, str) and len(own_axes) == len(shape):
        axes = own_axes
    if len(axes) == len(shape):
        kwargs["axis_labels"] = tuple(axes)
    scale = ours.get("scale")
    if not (isinstance(scale, list) and len(scale) == len(shape)
            and all(isinstance(v, (int, float)) and v > 0 for v in scale)):
        scale = [sizes.get(a, 1.0) for a in axes] if len(axes) == len(shape) else None
    if scale is not None and any(v != 1.0 for v in scale):
        kwargs["scale"] = tuple(float(v) for v in scale)
        unit = ours.get("unit") or unit
        if isinstance(unit, str) and unit:
            kwargs["units"] = tuple(unit for _ in scale)
    colormap = _colormap(ours.get("colormap"))
    if colormap is not None:
        kwargs["colormap"] = colormap
    return kwargs


def _colormap(stored):
    """A napari labels colormap from what :mod:`napari_stego._writer` stored (``None``:
    napari's default)."""
    if not isinstance(stored, dict):
        return None
    try:
        if "direct" in stored:
            colors = {(None if k == "None" else int(k)): v for k, v in stored["direct"].items()}
            return colors
        if "cyclic" in stored:
            from napari.utils.colormaps import CyclicLabelColormap

            c = stored["cyclic"]
            return CyclicLabelColormap(colors=np.asarray(c["colors"], np.float32),
                                       seed=float(c.get("seed", 0.5)))
    except Exception:
        return None
    return None
