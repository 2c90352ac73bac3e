"""The labels convention, and the metadata every labels output carries.

**Convention.** Every labels *file* and *layer* napari-stego writes holds cluster **ids
1..K**: label value = cluster index + :data:`LABEL_OFFSET`, so 0 stays free for "no data"
(a slice not segmented yet, a blank plane the batch job skipped). This holds whoever wrote
them: the CLI / :func:`~napari_stego.batch.segment_files`, the Segment widget, the napari
writer, the demo, :func:`save_labels`.

The Python API returns **0-based cluster indices** (0..K-1, the index into
``predict_proba``'s first axis and the model's centroids): ``StegoModel.predict``,
``predict_lazy`` and ``crf.*``. :func:`to_ids` turns them into ids;
:func:`save_labels` does so while writing.

**Metadata.** A labels output records its convention (``label_offset``), its axes
(``ZYX``, ``TZYX``...), the physical pixel size per axis (``scale``) and ``unit``, the
model's K and the CRF settings (:func:`label_metadata`). TIFFs are written as ImageJ
hyperstacks where ImageJ allows (axes in ``TZCYX`` order, uint8 / uint16 / float32), so
Fiji, tifffile and napari read the axes, the pixel size (resolution tags) and the Z
``spacing`` and ``unit``; other files are tifffile "shaped" TIFFs with the axes and the
resolution tags. napari-stego's own JSON block (:data:`~napari_stego.io.META_KEY`) sits in
the description either way and :func:`read_own_metadata` finds it.

Outputs written before this convention (0-based, no ``label_offset``) are recognised by
:func:`is_current`: the batch job recomputes them instead of resuming them.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np

from .io import META_KEY

LABEL_OFFSET = 1
CONVENTION = "label = cluster index + 1 (ids 1..K); 0 = no data"
_IMAGEJ_ORDER = "TZCYX"
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_IMAGEJ_MAX_BYTES = 2**32 - 2**25  # ImageJ TIFFs cannot be BigTIFF: bigger outputs are shaped


def labels_dtype(n_clusters: int) -> np.dtype:
    """The one labels dtype for a model of ``n_clusters`` clusters: the smallest unsigned
    type holding the ids 1..K (uint8 up to K = 255, uint16 up to 65 534, else uint32)."""
    top = int(n_clusters) - 1 + LABEL_OFFSET
    for dt in (np.uint8, np.uint16):
        if top <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint32)


def to_ids(indices, n_clusters: int):
    """0-based cluster indices (numpy or dask) -> ids 1..K in :func:`labels_dtype`."""
    dtype = labels_dtype(n_clusters)
    return indices.astype(dtype) + dtype.type(LABEL_OFFSET)


def ids_of(probs, n_clusters: int | None = None):
    """Ids 1..K of probabilities ``(..., K, H, W)``: their argmax plus the offset."""
    k = probs.shape[-3] if n_clusters is None else n_clusters
    return to_ids(probs.argmax(-3), k)


def crf_metadata(config=None, backend: str | None = None) -> dict | None:
    """The CRF settings of an output (``None``: no CRF): every :class:`CRFConfig` field
    and the backend (``"auto"`` when none was named)."""
    if config is None and backend is None:
        return None
    from .crf import CRFConfig

    config = CRFConfig() if config is None else config
    out = asdict(config)
    out["intensity"] = {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in out["intensity"].items()}
    out["backend"] = backend or "auto"
    return out


def label_metadata(n_clusters: int, axes: str, scale: Iterable[float] | None = None,
                   unit: str | None = None, crf: dict | None = None,
                   name: str | None = None) -> dict:
    """The block every labels output carries (and that entry points agree on).

    ``axes``: one letter per output axis (``YX``, ``ZYX``, ``TZYX``...); ``scale``: the
    physical size of one pixel along each (default 1); ``unit``: of the scale (``None``:
    pixels); ``crf``: :func:`crf_metadata` or ``None``.
    """
    axes = str(axes).upper()
    scale = [1.0] * len(axes) if scale is None else [float(s) for s in scale]
    if len(scale) != len(axes):
        raise ValueError(f"scale {scale} does not match axes {axes!r}")
    out = dict(label_offset=LABEL_OFFSET, labels=CONVENTION, n_clusters=int(n_clusters),
               axes=axes, scale=scale, unit=unit, crf=crf)
    if name is not None:
        out["layer_name"] = name
    return out


COMMON_KEYS = ("label_offset", "labels", "n_clusters", "axes", "scale", "unit", "crf")


def common(meta: dict) -> dict:
    """The :func:`label_metadata` part of an output's metadata (to compare outputs)."""
    return {k: meta.get(k) for k in COMMON_KEYS}


def is_current(meta: dict | None) -> bool:
    """Whether an output's metadata says it holds ids 1..K (written by this version)."""
    return isinstance(meta, dict) and meta.get("label_offset") == LABEL_OFFSET


# --------------------------------------------------------------------- TIFF metadata
def pixel_sizes(tif, axes: str) -> tuple[dict, str | None]:
    """``({axis: physical pixel size}, unit)`` of an open ``tifffile.TiffFile`` from its
    OME, ImageJ or napari-stego metadata (axes without one are left out)."""
    sizes: dict = {}
    unit = None
    try:
        ours = read_own_metadata(tif)
        if ours and isinstance(ours.get("scale"), list) and isinstance(ours.get("axes"), str) \
                and len(ours["scale"]) == len(ours["axes"]):
            sizes = {a: float(s) for a, s in zip(ours["axes"], ours["scale"])}
            unit = ours.get("unit")
        elif tif.is_ome:
            import tifffile

            ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
            image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
            pixels = image["Pixels"]
            for a in "XYZ":
                if f"PhysicalSize{a}" in pixels:
                    sizes[a] = float(pixels[f"PhysicalSize{a}"])
                    unit = unit or pixels.get(f"PhysicalSize{a}Unit", "µm")
        elif tif.is_imagej:
            ij = tif.imagej_metadata or {}
            if "spacing" in ij and "Z" in axes:
                sizes["Z"] = float(ij["spacing"])
            page = tif.pages.first
            for a, tag in (("X", "XResolution"), ("Y", "YResolution")):
                if tag in page.tags:
                    num, den = page.tags[tag].value
                    if num:
                        sizes[a] = den / num
            unit = ij.get("unit") if isinstance(ij.get("unit"), str) else None
    except Exception:
        return {}, None
    sizes = {k: v for k, v in sizes.items() if np.isfinite(v) and v > 0}
    if unit in ("micron", "um", "\\u00B5m"):
        unit = "µm"
    return sizes, (unit if sizes else None)


def read_own_metadata(tif) -> dict | None:
    """napari-stego's JSON block of an open ``tifffile.TiffFile`` (shaped or ImageJ
    description), or ``None``."""
    raw = None
    try:
        shaped = tif.shaped_metadata
        if shaped and isinstance(shaped[0], dict):
            raw = shaped[0].get(META_KEY)
        if raw is None and tif.is_imagej:
            raw = (tif.imagej_metadata or {}).get(META_KEY)
    except Exception:
        return None
    if raw is None:
        return None
    try:
        ours = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    return ours if isinstance(ours, dict) else None


def _imagej_unit(unit: str | None) -> str | None:
    return None if unit is None else ("micron" if unit in ("µm", "um", "micrometer") else unit)


def with_axes(meta: dict, shape: tuple[int, ...]) -> dict:
    """``meta`` fitted to an output of ``shape``: a probabilities output (one axis more
    than its labels) gets a ``C`` (cluster) axis before ``YX``, of scale 1."""
    axes, scale = meta.get("axes"), meta.get("scale")
    if isinstance(axes, str) and len(axes) == len(shape) - 1 and isinstance(scale, list) \
            and len(scale) == len(axes):
        meta = dict(meta, axes=axes[:-2] + "C" + axes[-2:],
                    scale=[*scale[:-2], 1.0, *scale[-2:]])
    return meta


def tiff_kwargs(shape: tuple[int, ...], dtype, meta: dict) -> dict:
    """Keyword arguments of ``tifffile.imwrite`` for a labels / probabilities output whose
    :func:`label_metadata` is in ``meta`` (its ``axes`` may name a ``C`` axis: clusters).

    An ImageJ hyperstack when the axes are in ImageJ's ``TZCYX`` order, the dtype is one
    ImageJ reads and the data fits a classic TIFF (under 4 GB); else a tifffile shaped
    (Big)TIFF with the axes. Both carry the X / Y pixel
    size as resolution tags and ``meta`` as JSON."""
    meta = with_axes(meta, shape)
    axes = meta.get("axes") or ""
    if len(axes) != len(shape):  # no usable axes: tifffile's own
        axes = ""
    scale = dict(zip(axes, meta.get("scale") or []))
    kwargs: dict = dict(photometric="minisblack", compression="zlib")
    sx, sy = scale.get("X", 1.0), scale.get("Y", 1.0)
    if (sx, sy) != (1.0, 1.0) or meta.get("unit"):
        kwargs["resolution"] = (1.0 / sx, 1.0 / sy)
    text = json.dumps(meta)
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    imagej = (bool(axes) and size < _IMAGEJ_MAX_BYTES and np.dtype(dtype) in _IMAGEJ_DTYPES
              and all(a in _IMAGEJ_ORDER for a in axes)
              and list(axes) == sorted(axes, key=_IMAGEJ_ORDER.index))
    if imagej:
        ij: dict = {"axes": axes, META_KEY: text}
        if "Z" in scale:
            ij["spacing"] = float(scale["Z"])
        if meta.get("unit"):
            ij["unit"] = _imagej_unit(meta["unit"])
        kwargs.update(imagej=True, metadata=ij)
    else:
        md: dict = {META_KEY: text}
        if axes:
            md["axes"] = axes
        kwargs["metadata"] = md
        if "resolution" in kwargs and meta.get("unit") in ("µm", "um", "micron", "micrometer"):
            kwargs["resolution"] = (1e4 / sx, 1e4 / sy)  # pixels per centimetre
            kwargs["resolutionunit"] = "CENTIMETER"
    return kwargs


def save_labels(path, labels, *, n_clusters: int, axes: str | None = None,
                scale: Iterable[float] | None = None, unit: str | None = None,
                crf: dict | None = None, name: str | None = None, extra: dict | None = None,
                indices: bool = True):
    """Write labels as a TIFF with the full metadata; returns the path.

    ``labels``: 0-based cluster indices (what ``StegoModel.predict`` / ``predict_lazy``
    return; numpy or dask, written plane by plane) or, with ``indices=False``, ids already.
    ``axes`` default: ``YX``, ``ZYX`` or ``TZYX`` by the number of axes.
    """
    import tifffile

    from .errors import StegoError

    shape = tuple(int(s) for s in labels.shape)
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(len(shape), "")
    if len(axes) != len(shape):
        raise StegoError(f"axes {axes!r} do not fit labels of shape {shape}")
    data = to_ids(labels, n_clusters) if indices else labels
    dtype = labels_dtype(n_clusters)
    meta = dict(written_by="napari-stego", complete=True)
    meta.update(extra or {})
    meta.update(label_metadata(n_clusters, axes, scale, unit, crf, name))
    if len(shape) > 2:
        pages = (np.asarray(data[idx]).astype(dtype, copy=False)
                 for idx in np.ndindex(*shape[:-2]))
    else:
        pages = np.asarray(data).astype(dtype, copy=False)
    from .batch.writes import _atomic_write  # (batch.writes imports this module)

    # under a temporary name, renamed when complete: a failure (a plane that cannot be
    # computed, a full disk, an interrupt) leaves neither a half-written file nor a
    # destroyed earlier one at ``path``
    _atomic_write(Path(path), lambda tmp: tifffile.imwrite(
        str(tmp), pages, shape=shape, dtype=dtype, **tiff_kwargs(shape, dtype, meta)))
    return path
