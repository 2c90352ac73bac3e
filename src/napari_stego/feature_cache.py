"""The feature cache of a source: which :class:`~napari_stego.cache.FeatureStore` holds its
features (a hash of everything that determines them: pixels, intensity mapping, backbone and
weights, tiling), how big it is, and filling the planes it lacks with
:func:`~napari_stego.features.extract_source`.
"""

from __future__ import annotations

from .backbones import Backbone
from .features import (
    MEMORY_CACHE_BYTES,
    FeatureConfig,
    Progress,
    extract_source,
    feature_grid,
    log,
    tile_halo,
)
from .intensity import IntensityStats, fit_intensity
from .io import ImageSource
from .tiling import TileConfig


def source_signature(backbone: Backbone, source: ImageSource, stats: IntensityStats,
                     config: FeatureConfig, tiles: TileConfig, data_hash: str = "auto") -> dict:
    """Everything that determines a source's features (the cache key's input)."""
    from . import __version__
    from .cache import CACHE_FORMAT, weights_fingerprint
    from .io import data_fingerprint

    tile, halo = tile_halo(tiles, backbone)
    return dict(
        cache_format=CACHE_FORMAT,
        package_version=__version__,
        data=data_fingerprint(source, data_hash),
        shape=list(source.shape),
        axes=source.axes,
        dtype=source.dtype.str,
        intensity=stats.to_dict(),
        backbone=backbone.spec.name,
        weights=weights_fingerprint(backbone),
        features=dict(min_side=config.min_side, autocast=config.autocast,
                      upsample=backbone.upsample),
        tiles=dict(tile=tile, halo=halo, blend=tiles.blend),
    )


def store_layout(backbone: Backbone, source: ImageSource, config: FeatureConfig,
                 tiles: TileConfig):
    """The :class:`~napari_stego.cache.StoreLayout` of a source's features.

    Chunks are half a tile's cells (so tile cores write whole chunks and training windows
    read few bytes).
    """
    from .cache import StoreLayout

    h, w = feature_grid(source.shape2d, backbone, config)
    tile, _ = tile_halo(tiles, backbone)
    tc = tile // backbone.stride
    chunk = tc // 2 if tc % 2 == 0 and tc >= 32 else tc
    return StoreLayout(source.n_planes, backbone.dim, h, w, chunk)


def estimate_cache_bytes(backbone: Backbone, source: ImageSource, config: FeatureConfig = FeatureConfig(),
                         tiles: TileConfig = TileConfig()) -> int:
    """Disk bytes the features of ``source`` take in the cache (float16)."""
    return store_layout(backbone, source, config, tiles).nbytes


def feature_store(backbone: Backbone, source: ImageSource, config: FeatureConfig,
                  tiles: TileConfig, cache, *, stats: IntensityStats | None = None,
                  data_hash: str = "auto"):
    """Open (or find) the :class:`~napari_stego.cache.FeatureStore` of a source.

    Args:
        cache: a folder; ``True`` (:func:`~napari_stego.cache.default_cache_dir`); ``False``
            (in memory); ``None``: in memory up to ``MEMORY_CACHE_BYTES`` of features, else
            the default folder (with a log message), so big data never fills the RAM.

    Returns:
        ``(store, stats)``. Nothing is computed; see :func:`ensure_features`.

    Raises:
        StegoError: the disk would fill (the message gives the size and what to do).
    """
    from .cache import FeatureStore, default_cache_dir, format_bytes

    stats = stats if stats is not None else fit_intensity(source, config.intensity)
    sig = source_signature(backbone, source, stats, config, tiles, data_hash)
    layout = store_layout(backbone, source, config, tiles)
    if cache is None:
        cache = layout.nbytes > MEMORY_CACHE_BYTES
        if cache:
            log.warning("features of %s take %s: caching them on disk in %s (pass cache=FOLDER "
                        "to choose where, cache=False to keep them in memory)", source,
                        format_bytes(layout.nbytes), default_cache_dir())
    folder = default_cache_dir() if cache is True else (None if cache is False else cache)
    store = FeatureStore.open(folder, sig, layout)
    if store.missing():
        log.info("features of %s: %d planes of %s cells, %s in %s", source, layout.n_planes,
                 (layout.dim, layout.height, layout.width), format_bytes(layout.nbytes),
                 store.path or "memory")
    return store, stats


def ensure_features(backbone: Backbone, source: ImageSource, config: FeatureConfig,
                    tiles: TileConfig, cache, device, *, stats: IntensityStats | None = None,
                    data_hash: str = "auto", progress: Progress | None = None, cancel=None):
    """:func:`feature_store` plus :func:`extract_source` for the planes it lacks.

    Returns:
        ``(store, stats)`` with every plane complete.
    """
    store, stats = feature_store(backbone, source, config, tiles, cache, stats=stats,
                                 data_hash=data_hash)
    if store.missing():
        extract_source(backbone, source, store, config, tiles, device, stats=stats,
                       progress=progress, cancel=cancel)
    elif progress is not None:
        progress("features", 1, 1)
    return store, stats
