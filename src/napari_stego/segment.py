"""One segmentation path: an image or stack, plane by plane, to labels ids 1..K.

:class:`Segmentation` owns what every entry point must do the same way to get the same
labels: one intensity mapping for the whole stack (:func:`~napari_stego.io.fit_intensity`),
the model's tiles (:func:`~napari_stego.lazy.predict_dask`), the CRF (its settings and
backend, refined with the stack-wide mapping, tile by tile for big planes), and the
labels convention (:mod:`napari_stego.labels`: ids 1..K, 0 = no data). ``predict_lazy``
gives the same planes (as 0-based indices), the Segment widget, the demo and
:func:`save_segmentation` use it, and the batch job computes the same (plane by plane on
workers, with the statistics measured once per stack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .io import TIFF_FILE_SUFFIXES, ImageSource, fit_intensity, open_image
from .labels import crf_metadata, ids_of, label_metadata, labels_dtype, save_labels

Progress = Callable[[str, int, int], None]


def refine(image: np.ndarray, probs: np.ndarray, *, config=None, backend: str | None = None,
           intensity=None, single_tile: bool = True, device=None) -> np.ndarray:
    """CRF-refined probabilities of one plane: :func:`~napari_stego.crf.dense_crf` when
    the plane is one model tile, else :func:`~napari_stego.crf.dense_crf_tiled`."""
    from .crf import dense_crf, dense_crf_tiled

    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    run = dense_crf if single_tile else dense_crf_tiled
    return run(image, probs, config=config, backend=backend, intensity=intensity,
               device=device)


class Segmentation:
    """The segmentation of one image or stack with one model.

    Args:
        model: a fitted :class:`~napari_stego.model.StegoModel`.
        data: anything :func:`~napari_stego.io.open_image` opens (``axes``, ``rgb`` as
            there).
        crf: a :class:`~napari_stego.crf.CRFConfig` (or ``True`` for the defaults) to refine
            every plane, else ``None``.
        crf_backend: ``None`` / ``"auto"``, ``"torch"`` or ``"pydensecrf"``.
        stats, crf_stats: the intensity mappings of the features and of the CRF (default:
            measured on the whole stack now).
        cache: as for ``StegoModel.predict_lazy``.
    """

    def __init__(self, model, data, *, axes: str | None = None, rgb: bool | None = None,
                 crf=None, crf_backend: str | None = None, stats=None, crf_stats=None,
                 cache=None,
                 data_hash: str = "auto", progress: Progress | None = None,
                 cancel=None) -> None:
        from .lazy import predict_dask

        self.model = model
        self.source: ImageSource = open_image(data, axes, rgb=rgb)
        self.stats = stats if stats is not None else fit_intensity(
            self.source, model.feature_config.intensity)
        if crf is True:
            from .crf import CRFConfig

            crf = CRFConfig()
        if crf:
            from .crf import with_channels_of

            crf = with_channels_of(crf, model.feature_config.intensity)
        self.crf = crf or None
        self.crf_backend = None if crf_backend in (None, "auto") else crf_backend
        self.crf_stats = crf_stats
        if self.crf is not None and crf_stats is None:
            same = self.crf.intensity == model.feature_config.intensity
            self.crf_stats = self.stats if same else fit_intensity(self.source,
                                                                   self.crf.intensity)
        store = None
        if cache in (None, False) and model.tile_config.blend == "taper":
            # tapered tiles blend the assembled feature map: compute it (as predict does)
            from .features import TensorSink, extract_source, feature_grid

            h, w = feature_grid(self.source.shape2d, model.backbone, model.feature_config)
            store = TensorSink(self.source.n_planes, model.backbone.dim, h, w)
            extract_source(model.backbone, self.source, store, model.feature_config,
                           model.tile_config, model.device, stats=self.stats,
                           progress=progress, cancel=cancel)
        elif cache not in (None, False):
            from .feature_cache import ensure_features

            store, _ = ensure_features(model.backbone, self.source, model.feature_config,
                                       model.tile_config, cache, model.device,
                                       stats=self.stats, data_hash=data_hash,
                                       progress=progress, cancel=cancel)
        # 0-based indices and probabilities, lazily (what predict_lazy returns)
        self.indices, self.probs = predict_dask(model, self.source, self.stats,
                                                model.tile_config, store, progress=progress,
                                                cancel=cancel)

    @property
    def n_clusters(self) -> int:
        return int(self.model.n_clusters)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the labels: the source's plane axes, then ``(Y, X)``."""
        return self.source.out_shape

    @property
    def axes(self) -> str:
        """The labels' axes: the source's plane axes, then ``YX``."""
        return self.source.lead_axes + "YX"

    def probabilities(self, plane: int) -> np.ndarray:
        """``(K, H, W)`` float32 probabilities of plane number ``plane`` (no CRF)."""
        idx = self.source.plane_index(plane)
        # in-process threads: never ship the model to a dask.distributed Client
        return np.asarray(self.probs[idx].compute(scheduler="threads"))

    def refined(self, plane: int, probs: np.ndarray) -> np.ndarray:
        """``probs`` of plane ``plane`` refined with this segmentation's CRF settings and
        the stack-wide intensity mapping (tile by tile when the plane is bigger than a
        model tile)."""
        from .crf import CRFConfig
        from .features import is_single_tile

        m = self.model
        return refine(self.source.block(plane), probs, config=self.crf or CRFConfig(),
                      backend=self.crf_backend, intensity=self.crf_stats,
                      single_tile=is_single_tile(self.source.shape2d, m.backbone,
                                                 m.feature_config, m.tile_config))

    def plane(self, plane: int, *, proba: bool = False):
        """Ids 1..K ``(H, W)`` of plane number ``plane`` (C order over the plane axes);
        with ``proba`` also its ``(K, H, W)`` float32 probabilities (refined with the CRF)."""
        probs = self.probabilities(plane)
        if self.crf is not None:
            probs = self.refined(plane, probs)
        ids = ids_of(probs, self.n_clusters)
        return (ids, probs.astype(np.float32, copy=False)) if proba else ids

    def planes(self, order: Iterable[int] | None = None):
        """``(plane, ids)`` of every plane (or those of ``order``, in that order)."""
        for p in (range(self.source.n_planes) if order is None else order):
            yield p, self.plane(p)

    def labels(self) -> np.ndarray:
        """Ids 1..K of every plane, ``(*planes, Y, X)``, in memory."""
        out = np.zeros(self.shape, labels_dtype(self.n_clusters))
        for p, ids in self.planes():
            out[self.source.plane_index(p)] = ids
        return out

    def metadata(self, scale: Iterable[float] | None = None, unit: str | None = None,
                 name: str | None = None) -> dict:
        """The :func:`~napari_stego.labels.label_metadata` of these labels."""
        crf = crf_metadata(self.crf, self.crf_backend) if self.crf is not None else None
        return label_metadata(self.n_clusters, self.axes, scale, unit, crf, name)


def save_segmentation(model, data, path: str | Path, *, axes: str | None = None,
                      scale: Iterable[float] | None = None, unit: str | None = None,
                      crf=None, crf_backend: str | None = None, name: str | None = None,
                      extra: dict | None = None) -> Path:
    """Segment ``data`` (:class:`Segmentation`) and write the labels (ids 1..K) as a TIFF
    with their axes, pixel size and the settings (:func:`~napari_stego.labels.save_labels`).

    ``scale`` / ``unit`` default to the TIFF's own pixel size when ``data`` is a TIFF path
    (other paths, e.g. a zarr array, and arrays: 1 per axis, no unit).
    """
    seg = Segmentation(model, data, axes=axes, crf=crf, crf_backend=crf_backend)
    if scale is None and isinstance(data, (str, Path)) and \
            Path(data).suffix.lower() in TIFF_FILE_SUFFIXES:
        scale, unit = tiff_scale(data, seg.axes)
    meta = seg.metadata(scale, unit, name)
    return save_labels(path, seg.labels(), n_clusters=seg.n_clusters, axes=seg.axes,
                       scale=meta["scale"], unit=meta["unit"], crf=meta["crf"], name=name,
                       extra=extra, indices=False)


def tiff_scale(path: str | Path, axes: str) -> tuple[list[float], str | None]:
    """The physical pixel size of a TIFF along ``axes`` (1 where unknown) and its unit."""
    import tifffile

    from .labels import pixel_sizes

    with tifffile.TiffFile(str(path)) as tif:
        sizes, unit = pixel_sizes(tif, tif.series[0].axes.upper())
    return [float(sizes.get(a, 1.0)) for a in axes], unit
