"""Tile grids for big images: cores aligned to the backbone's grid, halos, blending weights.

Pure numpy, no models (stardist's ``big.py`` idea). A 2D image of ``(H, W)`` pixels is cut
into *cores* of ``tile`` pixels; each core is read with a *halo* of context around it (the
*read* region, clipped at the image border), run through the backbone, and only its core is
kept (``blend="crop"``) or its whole read region is averaged with its neighbours' using
tapered weights that sum to one (``blend="taper"``).

Every core and read boundary inside the image is a multiple of ``align`` pixels (the
backbone's ``pad_to``: its patch size for a ViT, 32 for EfficientNet), so a tile's feature
grid lines up with the whole image's grid and a feature cell ``c`` covers pixels
``[c * stride, (c + 1) * stride)`` in both. An image that fits one read region
(``<= tile + 2 * halo`` pixels along an axis) is a single tile: tiled and whole-image
processing are then the same computation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import StegoError

BLENDS = ("crop", "taper")


@dataclass(frozen=True)
class TileConfig:
    """How big images are tiled for the backbone, and how big feature maps feed training.

    ``tile``: core side in pixels, rounded up to a multiple of the backbone's ``pad_to``.
    ``halo``: context pixels read on each side of a core (also rounded up); ``None`` picks
    the backbone's default (128 px for the EfficientNet, whose stride-32 features see far;
    8 patches for a ViT).
    ``blend``: ``"crop"`` keeps each tile's core only; ``"taper"`` averages overlapping tiles
    with linear ramps over the ``2 * halo`` overlap (smoother, but needs a buffer one tile row
    high and as wide as the image).
    ``batch_size``: tiles per backbone call (halved automatically when the GPU runs out of
    memory); ``None``: 8 on CUDA, 1 elsewhere (the CPU gains nothing from batches and a
    1280 px tile already takes about 0.6 GB there).
    ``train_crop``: feature cells per side of the crops a big feature map is cut into for
    training (the crops are the "images" of KNN mining); ``None``: twice the training window,
    rounded up to the cache's chunk.
    ``max_train_crops``: how many crops of big maps (and planes of cached stacks) take part
    in training, a seeded random subset over all planes; ``None``: as many as fit
    ``train_ram_mb`` (82 crops of 64 x 64 cells x 472 channels). Small in-memory images
    are always all used.
    ``train_ram_mb``: float16 crops are held in RAM up to this total; crops beyond it (only
    with an explicit ``max_train_crops``) are read from the feature cache as windows are
    drawn. The default keeps fitting under ~3 GB of RAM: the automatic loss shifts
    (:func:`napari_stego.shifts.feature_centroids`) currently copy every crop to float32 at
    once, so each feature value of the crops costs ~10 bytes at the peak.
    """

    tile: int = 1024
    halo: int | None = None
    blend: str = "crop"
    batch_size: int | None = None
    train_crop: int | None = None
    max_train_crops: int | None = None
    train_ram_mb: int = 320

    def __post_init__(self):
        for name in ("tile", "batch_size", "max_train_crops"):
            value = getattr(self, name)
            if value is None and name in ("batch_size", "max_train_crops"):
                continue
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise StegoError(f"TileConfig.{name} must be a positive integer, got {value!r}")
        if self.halo is not None and (not isinstance(self.halo, (int, np.integer))
                                      or self.halo < 0):
            raise StegoError(f"TileConfig.halo must be an integer >= 0 pixels, got {self.halo!r}")
        if self.blend not in BLENDS:
            raise StegoError(f"TileConfig.blend must be one of {BLENDS}, got {self.blend!r}")
        if self.train_crop is not None and (not isinstance(self.train_crop, (int, np.integer))
                                            or self.train_crop < 2):
            raise StegoError(f"TileConfig.train_crop must be None or an integer >= 2 cells, "
                             f"got {self.train_crop!r}")
        if not isinstance(self.train_ram_mb, (int, np.integer)) or self.train_ram_mb < 0:
            raise StegoError(f"TileConfig.train_ram_mb must be an integer >= 0, "
                             f"got {self.train_ram_mb!r}")


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-int(value) // int(multiple)) * int(multiple)


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in pixels: ``core`` ⊂ ``read`` ⊂ ``[0, length)``."""

    core: tuple[int, int]
    read: tuple[int, int]


@dataclass(frozen=True)
class Tile:
    """A 2D tile: index ``(row, col)`` in the grid, and its spans along Y and X (pixels)."""

    index: tuple[int, int]
    y: Span
    x: Span

    @property
    def read(self) -> tuple[slice, slice]:
        """Slices of the image to read (core plus halo)."""
        return slice(*self.y.read), slice(*self.x.read)

    @property
    def core(self) -> tuple[slice, slice]:
        """Slices of the image this tile is responsible for."""
        return slice(*self.y.core), slice(*self.x.core)

    @property
    def read_shape(self) -> tuple[int, int]:
        return self.y.read[1] - self.y.read[0], self.x.read[1] - self.x.read[0]

    @property
    def core_shape(self) -> tuple[int, int]:
        return self.y.core[1] - self.y.core[0], self.x.core[1] - self.x.core[0]

    @property
    def crop(self) -> tuple[slice, slice]:
        """Slices of the read region (pixels) that hold the core."""
        return (slice(self.y.core[0] - self.y.read[0], self.y.core[1] - self.y.read[0]),
                slice(self.x.core[0] - self.x.read[0], self.x.core[1] - self.x.read[0]))


def effective(config: TileConfig, align: int, default_halo: int = 128) -> tuple[int, int]:
    """``(tile, halo)`` in pixels after rounding up to multiples of ``align`` (``halo=None``
    becomes ``default_halo``)."""
    halo = default_halo if config.halo is None else config.halo
    return round_up(config.tile, align), round_up(halo, align)


def cover_1d(length: int, tile: int, halo: int, align: int = 1) -> list[Span]:
    """Cut ``[0, length)`` into cores of ``tile`` pixels, each read with ``halo`` on both sides.

    ``tile`` and ``halo`` are rounded up to multiples of ``align``; every boundary inside the
    axis is then a multiple of ``align``. An axis of at most ``tile + 2 * halo`` pixels is one
    span whose core and read region are the whole axis (no seams, no wasted context).

    Returns:
        spans in order; cores partition ``[0, length)``.
    """
    if length < 1:
        raise StegoError(f"cannot tile an axis of length {length}")
    tile, halo = round_up(max(tile, 1), align), round_up(max(halo, 0), align)
    if length <= tile + 2 * halo:
        return [Span((0, length), (0, length))]
    return _cut_1d(length, tile, halo)


def _cut_1d(length: int, tile: int, halo: int) -> list[Span]:
    """Cores of ``tile`` pixels from 0, each read with ``halo`` on both sides (clipped)."""
    spans = []
    for start in range(0, length, tile):
        end = min(start + tile, length)
        spans.append(Span((start, end), (max(0, start - halo), min(length, end + halo))))
    return spans


def tile_grid(shape: tuple[int, int], tile: int, halo: int, align: int = 1) -> list[Tile]:
    """The 2D tiles of an ``(H, W)`` image, row-major (product of two :func:`cover_1d`)."""
    return PlaneGrid.cover(shape, tile, halo, align).tiles()


@dataclass(frozen=True)
class PlaneGrid:
    """How one plane of ``shape`` ``(H, W)`` pixels is cut into tiles: the spans along Y and
    X (each core read with its halo, clipped to the plane). Decided once, by whoever plans
    the work (:func:`napari_stego.features.plane_grid` for the backbone, :meth:`blocks` for
    the tiled CRF), and used as it is by feature extraction, lazy prediction, batch jobs and
    the CRF.

    ``halo`` and ``align`` are what the spans were cut with (a window grown around a core,
    :meth:`grown`, is read the same way). ``whole``: the plane goes through the backbone in
    one piece, up-sampled (small images); it then has one span per axis.
    """

    shape: tuple[int, int]
    ys: tuple[Span, ...]
    xs: tuple[Span, ...]
    halo: int = 0
    align: int = 1
    whole: bool = False

    @classmethod
    def cover(cls, shape: tuple[int, int], tile: int, halo: int, align: int = 1) -> PlaneGrid:
        """Cores of ``tile`` pixels read with ``halo``, aligned (:func:`cover_1d` per axis)."""
        h, w = int(shape[0]), int(shape[1])
        return cls((h, w), tuple(cover_1d(h, tile, halo, align)),
                   tuple(cover_1d(w, tile, halo, align)), round_up(max(halo, 0), align), align)

    @classmethod
    def one_piece(cls, shape: tuple[int, int]) -> PlaneGrid:
        """The whole plane as one tile, up-sampled (``whole=True``)."""
        h, w = int(shape[0]), int(shape[1])
        return cls((h, w), (Span((0, h), (0, h)),), (Span((0, w), (0, w)),), whole=True)

    @classmethod
    def blocks(cls, shape: tuple[int, int], tile: int, halo: int) -> PlaneGrid:
        """Cores of ``tile`` pixels from the top-left, each read with ``halo``, unaligned and
        cut even when the plane would fit one read region (the tiled CRF's blocks)."""
        h, w = int(shape[0]), int(shape[1])
        return cls((h, w), tuple(_cut_1d(h, tile, halo)), tuple(_cut_1d(w, tile, halo)), halo)

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def single(self) -> bool:
        """One tile covers the plane (tiled and whole-plane work are the same)."""
        return self.n_tiles == 1

    @property
    def cores(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """The cores along Y and along X: ``(((y0, y1), ...), ((x0, x1), ...))``."""
        return tuple(s.core for s in self.ys), tuple(s.core for s in self.xs)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Core lengths along Y and X (dask chunks of one tile core each)."""
        return (tuple(s.core[1] - s.core[0] for s in self.ys),
                tuple(s.core[1] - s.core[0] for s in self.xs))

    def indices(self) -> list[tuple[int, int]]:
        """Every ``(row, column)``, row-major."""
        return [(i, j) for i in range(len(self.ys)) for j in range(len(self.xs))]

    def tile(self, iy: int, ix: int) -> Tile:
        return Tile((iy, ix), self.ys[iy], self.xs[ix])

    def tiles(self) -> list[Tile]:
        """Every tile, row-major."""
        return [self.tile(i, j) for i, j in self.indices()]

    def grown(self, iy: int, ix: int, grow: int) -> Tile:
        """Tile ``(iy, ix)``, or with ``grow > 0`` its core grown by ``grow`` pixels (clipped
        to the plane) and read with this grid's halo and alignment, like the grid's own
        reads (so its feature cells are the whole plane's): the window a CRF refines."""
        tile = self.tile(iy, ix)
        if grow <= 0:
            return tile

        def grown(span: Span, n: int) -> Span:
            c0, c1 = max(0, span.core[0] - grow), min(n, span.core[1] + grow)
            return Span((c0, c1), (max(0, (c0 - self.halo) // self.align * self.align),
                                   min(n, round_up(c1 + self.halo, self.align))))

        return Tile(tile.index, grown(tile.y, self.shape[0]), grown(tile.x, self.shape[1]))


def grid_shape(shape: tuple[int, int], tile: int, halo: int, align: int = 1) -> tuple[int, int]:
    """Number of tile rows and columns of :func:`tile_grid`."""
    grid = PlaneGrid.cover(shape, tile, halo, align)
    return len(grid.ys), len(grid.xs)


def cells(span: tuple[int, int], stride: int) -> tuple[int, int]:
    """Pixel interval -> the feature cells covering it: ``[a // s, ceil(b / s))``."""
    return span[0] // stride, -(-span[1] // stride)


def ramp_1d(span: Span, length: int, stride: int, halo: int, blend: str = "taper") -> np.ndarray:
    """Blending weights of one span along one axis, on its read region's feature cells.

    ``"crop"``: 1 on the core, 0 on the halo. ``"taper"``: 1 inside the core, falling linearly
    to 0 across the ``2 * halo`` overlap with each neighbour (from ``core - halo`` to
    ``core + halo``); sides at the image border keep weight 1. The weights of all spans of an
    axis sum to exactly 1 at every cell when neighbours overlap by ``2 * halo``.

    Returns:
        ``(n,)`` float32, ``n`` = cells of ``span.read``.
    """
    r0, r1 = cells(span.read, stride)
    c0, c1 = cells(span.core, stride)
    pos = np.arange(r0, r1, dtype=np.float64) + 0.5  # cell centres
    if blend == "crop" or halo == 0:
        return ((pos > c0) & (pos < c1)).astype(np.float32)
    h = halo / stride
    w = np.ones_like(pos)
    n_cells = -(-length // stride)
    if c0 > 0:  # a neighbour before us
        w = np.minimum(w, np.clip((pos - (c0 - h)) / (2 * h), 0, 1))
    if c1 < n_cells:  # a neighbour after us
        w = np.minimum(w, np.clip(((c1 + h) - pos) / (2 * h), 0, 1))
    return w.astype(np.float32)


def tile_weights(tile: Tile, shape: tuple[int, int], stride: int, halo: int,
                 blend: str = "taper") -> np.ndarray:
    """2D blending weights of a tile on its read region's feature grid: ``(h, w)`` float32."""
    return np.outer(ramp_1d(tile.y, shape[0], stride, halo, blend),
                    ramp_1d(tile.x, shape[1], stride, halo, blend))


def crop_windows(shape: tuple[int, int], size: int,
                 keep: int | None = None) -> list[tuple[int, int, int, int]]:
    """Cut a feature map of ``(h, w)`` cells into crops of ``size`` cells per side.

    An axis of at most ``keep`` cells (default ``2 * size``) stays whole, so small images
    stay one crop as before; a longer axis is cut into non-overlapping crops of ``size``
    cells starting at multiples of ``size``, plus one ending at the border when the last
    does not reach it.

    Returns:
        ``(y, x, h, w)`` crops, row-major.
    """
    keep = 2 * size if keep is None else keep

    def axis(n: int) -> list[tuple[int, int]]:
        if n <= keep:
            return [(0, n)]
        starts = list(range(0, n - size + 1, size))
        if starts[-1] + size < n:
            starts.append(n - size)
        return [(s, size) for s in starts]

    return [(y, x, h, w) for y, h in axis(shape[0]) for x, w in axis(shape[1])]


def iter_batches(items: list, key, batch_size: int) -> Iterator[list]:
    """Consecutive runs of ``items`` with equal ``key(item)``, at most ``batch_size`` long."""
    batch: list = []
    for item in items:
        if batch and (len(batch) >= batch_size or key(item) != key(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def n_tiles(shape: tuple[int, int], config: TileConfig, align: int,
            default_halo: int = 128) -> int:
    """Number of tiles of an ``(H, W)`` image."""
    gy, gx = grid_shape(shape, *effective(config, align, default_halo), align)
    return gy * gx


def compute_overhead(shape: tuple[int, int], config: TileConfig, align: int,
                     default_halo: int = 128) -> float:
    """Backbone pixels processed per image pixel (>= 1; the halo's extra cost)."""
    grid = tile_grid(shape, *effective(config, align, default_halo), align)
    read = sum(t.read_shape[0] * t.read_shape[1] for t in grid)
    return read / float(shape[0] * shape[1])


__all__ = [
    "BLENDS",
    "PlaneGrid",
    "Span",
    "Tile",
    "TileConfig",
    "cells",
    "compute_overhead",
    "cover_1d",
    "crop_windows",
    "effective",
    "grid_shape",
    "iter_batches",
    "n_tiles",
    "ramp_1d",
    "round_up",
    "tile_grid",
    "tile_weights",
]
