"""Dense backbone features of images and big stacks, computed once and kept for training and
prediction.

``extract_features`` runs one image through a :class:`~napari_stego.backbones.Backbone`; small
images are first up-sampled so their shorter side reaches ``min_side`` pixels (448: twice the
reference's 224-px training crops, see :class:`FeatureConfig`), so a 120 px blood-cell crop
still gives a usable feature grid. Images larger than one tile are cut into tiles with a halo
(:mod:`napari_stego.tiling`).

``extract_source`` does the same for every plane of a lazily read
:class:`~napari_stego.io.ImageSource` (a big 2D mosaic, a z-stack, a time-lapse), with one
intensity mapping for the whole stack: a reader thread pool reads and normalises tiles ahead,
tiles of equal shape go to the device in batches (bf16 autocast on CUDA; the batch is halved
when the GPU runs out of memory; features come back through pinned memory while the next batch
runs), and a writer thread stores the features in a
:class:`~napari_stego.cache.FeatureStore` (zarr, float16) plane by plane, so an interrupted
run resumes where it stopped. :func:`~napari_stego.feature_cache.feature_store` opens (or
finds) that store by a hash of everything that determines the features;
:func:`~napari_stego.train_crops.training_maps` cuts stored feature maps into the crops that
training draws from.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._device_runner import _autocast, _Runner
from .backbones import Backbone
from .errors import Cancelled, StegoError
from .intensity import IntensityConfig, IntensityStats, fit_intensity, to_rgb
from .io import ImageSource
from .tiling import (
    PlaneGrid,
    Tile,
    TileConfig,
    cells,
    effective,
    iter_batches,
    tile_weights,
)

Progress = Callable[[str, int, int], None]
log = logging.getLogger("napari_stego")
AUTOCAST = (None, "bfloat16", "float16")
MEMORY_CACHE_BYTES = 512 * 2**20  # cache=None keeps at most this much in memory


@dataclass(frozen=True)
class FeatureConfig:
    """How images become feature maps.

    ``min_side``: images whose shorter side is smaller are up-sampled (bilinear) to it. 448 px
    is the 224-px training window over ``TrainConfig.crop_ratio`` (0.5): the five crops that
    KNN mining makes of each image then hold a whole window, where a 224-px image gives crops
    half a window wide that training can only stretch (on the blood cells, 120 px, this took
    STEGO + CRF from 44.9 to 55.5 mIoU; 320 px gave nothing; docs/benchmarks.md).
    ``dtype``: storage type of cached features (float16 halves memory).
    ``autocast``: reduced precision for the backbone on CUDA (``"bfloat16"``, ``"float16"``
    or ``None`` for float32); CPU and MPS always run float32.
    ``upsample``: run the backbone on images up-sampled by this integer factor, for
    structures thinner than its stride (membranes, small nuclei): features every
    ``stride / upsample`` pixels at ``upsample**2`` times the backbone's time and memory (see
    :func:`~napari_stego.backbones.upsampled`). Applied on top of ``min_side``.
    """

    min_side: int = 448
    dtype: str = "float16"
    intensity: IntensityConfig = IntensityConfig()
    autocast: str | None = "bfloat16"
    upsample: int = 1

    def __post_init__(self):
        if not isinstance(self.upsample, (int, np.integer)) or self.upsample < 1:
            raise StegoError(f"FeatureConfig.upsample must be a positive integer, "
                             f"got {self.upsample!r}")
        if self.autocast not in AUTOCAST:
            raise StegoError(f"FeatureConfig.autocast must be one of {AUTOCAST}, "
                             f"got {self.autocast!r}")


def backbone_input(image: np.ndarray, config: FeatureConfig) -> torch.Tensor:
    """One image -> ``(1, 3, H', W')`` float32 in [0, 1], up-sampled to ``min_side`` if smaller."""
    return _upsample(torch.from_numpy(to_rgb(image, config.intensity)).permute(2, 0, 1)[None],
                     config.min_side)


def _upsample(rgb: torch.Tensor, min_side: int) -> torch.Tensor:
    h, w = rgb.shape[-2:]
    short = min(h, w)
    if short < min_side:
        size = work_size((h, w), min_side)
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return rgb


# longest side an up-sampled image may reach: with ``min_side`` 448 an up-sampled image has
# at most 448 x 4096 px (1.8 Mpx, about one default tile of 1280 x 1280 px), because it goes
# through the backbone whole; longer thin strips are not up-sampled but tiled. Images up to
# about 9 times longer than wide still reach ``min_side`` (so their KNN crops hold a window)
MAX_UPSAMPLED_SIDE = 4096


def work_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The size an image is resized to before the backbone (see :func:`backbone_input`).

    Images whose shorter side is below ``min_side`` are up-sampled towards it, but never so
    far that the longer side passes :data:`MAX_UPSAMPLED_SIDE` (a 2 x 2000 px strip would
    otherwise become 448 x 448 000 px), so an up-sampled image, which the backbone sees
    whole, is never bigger than about one CNN tile; when even that leaves nothing to up-sample,
    the image keeps its size and is tiled like any big image."""
    h, w = int(size[0]), int(size[1])
    short, long = min(h, w), max(h, w)
    if short >= min_side or short < 1:
        return h, w
    scale = min(min_side / short, MAX_UPSAMPLED_SIDE / long)
    if scale <= 1:
        return h, w
    return max(round(h * scale), 1), max(round(w * scale), 1)


@torch.inference_mode()
def extract_features(backbone: Backbone, image: np.ndarray, config: FeatureConfig = FeatureConfig(),
                     device: torch.device | str = "cpu", *,
                     tiles: TileConfig | None = None) -> torch.Tensor:
    """Features of one image.

    Images that fit one tile (``tiles.tile + 2 * tiles.halo`` pixels per side, after the
    ``min_side`` up-sampling) go through the backbone whole; bigger ones tile by tile with a
    halo (:func:`extract_source`), with the percentiles of the whole image.

    Args:
        backbone: a frozen backbone (moved to ``device`` by the caller).
        image: ``(H, W)`` or ``(H, W, C)`` array, any real dtype.
        tiles: tiling of big images (default :class:`~napari_stego.tiling.TileConfig`).

    Returns:
        ``(D, h, w)`` tensor on the CPU in ``config.dtype``, ``h = ceil(H'/stride)`` for the
        (possibly up-sampled) height ``H'``.
    """
    image = np.asarray(image)
    tiles = tiles or TileConfig()
    if is_single_tile(image.shape[:2], backbone, config, tiles):
        x = backbone.normalize(backbone_input(image, config).to(device))
        device = torch.device(device)
        with _autocast(device, config):
            feats = backbone(x)[0]
        return feats.to("cpu", getattr(torch, config.dtype))
    source = ImageSource(image, "YX" if image.ndim == 2 else "YXC")
    h, w = feature_grid(source.shape2d, backbone, config)
    sink = TensorSink(1, backbone.dim, h, w, config.dtype)
    extract_source(backbone, source, sink, config, tiles, device)
    return sink.tensors[0]


def extract_all(backbone: Backbone, images: Sequence[np.ndarray], config: FeatureConfig,
                device: torch.device | str, progress: Progress | None = None,
                cancel=None, *, tiles: TileConfig | None = None) -> list[torch.Tensor]:
    """:func:`extract_features` for each image, reporting ``("features", i, n)``."""
    out = []
    for i, image in enumerate(images):
        if cancel is not None and cancel.is_set():
            raise Cancelled("feature extraction cancelled")
        out.append(extract_features(backbone, image, config, device, tiles=tiles))
        if progress is not None:
            progress("features", i + 1, len(images))
    return out


# ---------------------------------------------------------------------------- planning


def default_halo(backbone: Backbone) -> int:
    """Halo pixels when ``TileConfig.halo`` is ``None``: 8 patches for a ViT, 128 px of
    backbone input for a CNN (EfficientNet-Lite0's stride-32 stage changes by ~2 % at 128 px
    from a tile border, and tiled labels then differ from whole-image labels on ~0.1-0.2 % of
    pixels); image pixels, so divided by the backbone's ``upsample``."""
    return 8 * backbone.stride if backbone.spec.family == "vit" else 128 // backbone.upsample


def default_tile(backbone: Backbone) -> int:
    """Core pixels the backbone sees when ``TileConfig.tile`` is ``None``: 1024 for a CNN; 64
    patches for a ViT (512 px for ViT-S/8, 1024 for /16, 896 for /14). A ViT attends over
    all the tokens of its read tile, so its time per pixel grows with the tokens: ViT-S/8 at
    1024 px cores (1152 px read, 20,736 tokens) ran at a fifth of its 224 px rate on an
    H200; 512 px cores (640 px read, 6,400 tokens) cost about half as much per image pixel,
    halo included (docs/benchmarks.md)."""
    if backbone.spec.family == "vit":
        return 64 * backbone.stride * backbone.upsample
    return 1024


def tile_halo(tiles: TileConfig, backbone: Backbone) -> tuple[int, int]:
    """``(tile, halo)`` image pixels for ``backbone``, aligned to its ``pad_to``.

    ``tiles.tile`` is the core size the backbone sees (``None``: :func:`default_tile`), so
    an up-sampled backbone (:func:`~napari_stego.backbones.upsampled`) reads ``upsample``
    times smaller cores of the image and a tile costs the same memory."""
    core = default_tile(backbone) if tiles.tile is None else tiles.tile
    tile = TileConfig(tile=max(core // backbone.upsample, 1), halo=tiles.halo)
    return effective(tile, backbone.spec.pad_to, default_halo(backbone))


BATCH_PIXELS = 8 * 1152 ** 2  # read pixels per backbone call on CUDA when not set


def batch_size(tiles: TileConfig, device: torch.device, backbone: Backbone | None = None) -> int:
    """Tiles per backbone call: ``tiles.batch_size``, else 1 on the CPU, and on CUDA as many
    read tiles of ``backbone`` as hold :data:`BATCH_PIXELS` pixels (at least 8, at most 64;
    8 without a backbone)."""
    if tiles.batch_size is not None:
        return tiles.batch_size
    if torch.device(device).type != "cuda":
        return 1
    if backbone is None:
        return 8
    tile, halo = tile_halo(tiles, backbone)
    read = (tile + 2 * halo) * backbone.upsample
    return int(min(64, max(8, BATCH_PIXELS // read ** 2)))


def plane_grid(shape2d: tuple[int, int], backbone: Backbone, config: FeatureConfig,
               tiles: TileConfig) -> PlaneGrid:
    """The tiles a plane of ``shape2d`` pixels goes through the backbone in: up-sampled
    small images in one piece, else cores of :func:`tile_halo` aligned to ``pad_to``."""
    work = work_size(shape2d, config.min_side)
    if tuple(work) != tuple(shape2d):  # up-sampled small images: always whole
        return PlaneGrid.one_piece(shape2d)
    tile, halo = tile_halo(tiles, backbone)
    return PlaneGrid.cover(shape2d, tile, halo, backbone.spec.pad_to)


def is_single_tile(shape2d: tuple[int, int], backbone: Backbone, config: FeatureConfig,
                   tiles: TileConfig) -> bool:
    """Whether an image of ``shape2d`` pixels goes through the backbone in one piece."""
    grid = plane_grid(shape2d, backbone, config, tiles)
    return grid.whole or grid.single


def feature_grid(shape2d: tuple[int, int], backbone: Backbone, config: FeatureConfig) -> tuple[int, int]:
    """Feature cells ``(h, w)`` of an image of ``shape2d`` pixels."""
    work = work_size(shape2d, config.min_side)
    s = backbone.stride
    return -(-work[0] // s), -(-work[1] // s)


@dataclass(frozen=True)
class _Job:
    """One backbone input: a tile of a plane (``tile is None``: the whole, up-sampled plane)."""

    plane: int
    tile: Tile | None
    shape: tuple[int, int]
    last: bool  # the plane's last job


def _plane_jobs(plane: int, source: ImageSource, backbone: Backbone, config: FeatureConfig,
                tiles: TileConfig) -> list[_Job]:
    shape2d = source.shape2d
    grid = plane_grid(shape2d, backbone, config, tiles)
    if grid.whole:
        return [_Job(plane, None, tuple(work_size(shape2d, config.min_side)), True)]
    parts = grid.tiles()
    return [_Job(plane, t, t.read_shape, i == len(parts) - 1) for i, t in enumerate(parts)]


def count_tiles(source: ImageSource, backbone: Backbone, config: FeatureConfig,
                tiles: TileConfig) -> int:
    """Backbone inputs needed for one plane of ``source``."""
    return len(_plane_jobs(0, source, backbone, config, tiles))


# ------------------------------------------------------------------------------- sinks


class TensorSink:
    """Features in memory: one ``(D, h, w)`` array per plane (the
    :class:`~napari_stego.cache.FeatureStore` interface, for single images)."""

    def __init__(self, n_planes: int, dim: int, height: int, width: int,
                 dtype: str = "float16") -> None:
        self.arrays = [np.zeros((dim, height, width), np.dtype(dtype)) for _ in range(n_planes)]
        self._done = [False] * n_planes

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in self.arrays]

    def missing(self) -> list[int]:
        return [i for i, d in enumerate(self._done) if not d]

    def is_done(self, plane: int) -> bool:
        return self._done[plane]

    def mark_done(self, plane: int) -> None:
        self._done[plane] = True

    def write(self, plane: int, ys: slice, xs: slice, feats) -> None:
        a = self.arrays[plane]
        a[:, ys, xs] = np.asarray(feats, dtype=a.dtype)

    def read(self, plane: int, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        return self.arrays[plane][:, ys, xs]


class _TaperPlane:
    """Accumulates tapered tiles of one plane in a band one tile row high, and hands
    finished rows to the sink (tiles must arrive row-major)."""

    def __init__(self, sink, plane: int, grid_cells: tuple[int, int], dim: int,
                 shape2d: tuple[int, int], stride: int, halo: int) -> None:
        self.sink, self.plane = sink, plane
        self.h, self.w = grid_cells
        self.dim, self.shape2d, self.stride, self.halo = dim, shape2d, stride, halo
        self.y0 = 0  # first cell row held
        self.acc = np.zeros((dim, 0, self.w), np.float32)
        self.wsum = np.zeros((0, self.w), np.float32)

    def _grow(self, y1: int) -> None:
        have = self.y0 + self.acc.shape[1]
        if y1 > have:
            extra = y1 - have
            self.acc = np.concatenate([self.acc, np.zeros((self.dim, extra, self.w), np.float32)], 1)
            self.wsum = np.concatenate([self.wsum, np.zeros((extra, self.w), np.float32)], 0)

    def add(self, tile: Tile, feats: np.ndarray) -> None:
        """``feats``: ``(D, h, w)`` on the tile's read cells."""
        wts = tile_weights(tile, self.shape2d, self.stride, self.halo, "taper")
        r0, r1 = cells(tile.y.read, self.stride)
        c0, c1 = cells(tile.x.read, self.stride)
        self._grow(r1)
        ys = slice(r0 - self.y0, r1 - self.y0)
        self.acc[:, ys, c0:c1] += feats.astype(np.float32) * wts
        self.wsum[ys, c0:c1] += wts

    def flush(self, upto: int) -> None:
        """Write rows ``[y0, upto)`` (all their tiles have arrived) and drop them."""
        n = min(upto, self.y0 + self.acc.shape[1]) - self.y0
        if n <= 0:
            return
        out = self.acc[:, :n] / np.maximum(self.wsum[:n], 1e-12)
        self.sink.write(self.plane, slice(self.y0, self.y0 + n), slice(0, self.w),
                        out.astype(np.float16))
        self.acc, self.wsum = self.acc[:, n:].copy(), self.wsum[n:].copy()
        self.y0 += n


def _load_job(source: ImageSource, stats: IntensityStats, job: _Job, min_side: int) -> np.ndarray:
    """Read and normalise one job's pixels: ``(3, h, w)`` float32."""
    if job.tile is None:
        rgb = stats.apply(source.block(job.plane))
        t = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        return _upsample(t, min_side)[0].numpy()
    rgb = stats.apply(source.block(job.plane, *job.tile.read))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def extract_source(backbone: Backbone, source: ImageSource, sink, config: FeatureConfig,
                   tiles: TileConfig, device: torch.device | str = "cpu", *,
                   stats: IntensityStats | None = None, planes: Sequence[int] | None = None,
                   progress: Progress | None = None, cancel=None,
                   readers: int | None = None, writers: int | None = None) -> int:
    """Compute the features of the planes of ``source`` into ``sink``, tile by tile.

    Args:
        backbone: frozen backbone, already on ``device``.
        source: the image or stack (read lazily, one tile at a time).
        sink: a :class:`~napari_stego.cache.FeatureStore` or :class:`TensorSink` of
            ``(N, D, h, w)`` with ``(h, w)`` = :func:`feature_grid`.
        stats: the intensity mapping (default: :func:`~napari_stego.intensity.fit_intensity` of the
            whole source, so every tile and plane is mapped alike).
        planes: planes to compute (default: those the sink lacks).
        progress: ``progress("features", tiles_done, tiles_total)``.
        cancel: anything with ``is_set()``; checked between batches. Completed planes stay in
            the sink.
        readers: threads reading and normalising tiles ahead of the device (default: half
            the CPU cores, 2 to 4).
        writers: threads writing the tiles of one batch into ``sink`` (default: a quarter of
            the CPU cores, 1 to 4; 1 with batches of one tile).

    Returns:
        the number of backbone calls made.
    """
    device = torch.device(device)
    stats = stats if stats is not None else fit_intensity(source, config.intensity)
    planes = list(sink.missing() if planes is None else planes)
    if not planes:
        return 0
    jobs = [j for p in planes for j in _plane_jobs(p, source, backbone, config, tiles)]
    total = len(jobs)
    stride = backbone.stride
    _, halo = tile_halo(tiles, backbone)
    grid_cells = feature_grid(source.shape2d, backbone, config)
    n_batch = batch_size(tiles, device, backbone)
    runner = _Runner(backbone, device, config, n_batch)
    batches = list(iter_batches(jobs, lambda j: j.shape, n_batch))
    taper = tiles.blend == "taper"
    tapers: dict[int, _TaperPlane] = {}

    # writer thread: stores finished tiles in order, marks planes complete
    write_q: queue.Queue = queue.Queue(maxsize=4)
    errors: list[BaseException] = []
    done_count = [0]

    def tapered(job: _Job) -> bool:
        t = job.tile
        return t is not None and taper and halo > 0 and (t.y.read != t.y.core
                                                         or t.x.read != t.x.core)

    def store(job: _Job, feats: np.ndarray) -> None:
        """Write one tile's features (the taper buffer's tiles in order, in this thread)."""
        t = job.tile
        if t is None:
            sink.write(job.plane, slice(None), slice(None), feats)
        elif tapered(job):
            tp = tapers.get(job.plane)
            if tp is None:
                tp = tapers[job.plane] = _TaperPlane(sink, job.plane, grid_cells, backbone.dim,
                                                     source.shape2d, stride, halo)
            tp.add(t, feats)
            if t.x.core[1] == source.width and t.y.core[1] < source.height:
                # end of a tile row: rows above the next row's read region are final
                tp.flush((t.y.core[1] - halo) // stride)
        else:
            r0, _ = cells(t.y.read, stride)
            c0, _ = cells(t.x.read, stride)
            y0, y1 = cells(t.y.core, stride)
            x0, x1 = cells(t.x.core, stride)
            sink.write(job.plane, slice(y0, y1), slice(x0, x1),
                       feats[:, y0 - r0:y1 - r0, x0 - c0:x1 - c0])

    def finish(job: _Job) -> None:
        if job.last:
            tp = tapers.pop(job.plane, None)
            if tp is not None:
                tp.flush(grid_cells[0])
            sink.mark_done(job.plane)
        done_count[0] += 1

    # the tiles of one batch are written by several threads at once (disjoint chunks of the
    # store; the copies and file writes release the GIL); a plane is marked complete only
    # after every write of its batch, and batches are written one after the other
    if writers is None:
        writers = 1 if n_batch == 1 else min(4, max(1, (os.cpu_count() or 2) // 4))
    wpool = ThreadPoolExecutor(writers, thread_name_prefix="napari-stego-writer") \
        if writers > 1 else None

    def writer() -> None:
        while True:
            item = write_q.get()
            if item is None:
                return
            if errors:
                continue
            try:
                batch, pending = item
                feats = pending.result()
                free = [k for k, job in enumerate(batch) if not tapered(job)]
                if wpool is not None and len(free) > 1:
                    list(wpool.map(lambda k: store(batch[k], feats[k]), free))
                else:
                    for k in free:
                        store(batch[k], feats[k])
                for k, job in enumerate(batch):
                    if tapered(job):
                        store(job, feats[k])
                    finish(job)
            except BaseException as exc:
                errors.append(exc)

    wthread = threading.Thread(target=writer, name="napari-stego-writer", daemon=True)
    wthread.start()
    if readers is None:
        readers = min(4, max(2, (os.cpu_count() or 2) // 2))
    pool = ThreadPoolExecutor(max(1, readers), thread_name_prefix="napari-stego-reader")

    def load(batch: list[_Job]) -> torch.Tensor:
        x = None
        for k, job in enumerate(batch):  # straight into one (pinned) buffer, no stacking
            arr = torch.from_numpy(_load_job(source, stats, job, config.min_side))
            if x is None:
                x = torch.empty((len(batch), *arr.shape), dtype=runner.host_dtype,
                                pin_memory=device.type == "cuda")
            x[k].copy_(arr)
        return x

    pending: collections.deque = collections.deque()
    ahead = max(2, readers + 1)
    finished = 0
    try:
        it = iter(batches)
        for batch in it:
            pending.append((batch, pool.submit(load, batch)))
            if len(pending) >= ahead:
                break
        while pending:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"feature extraction cancelled after {finished} of {total} tiles")
            if errors:
                raise errors[0]
            batch, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            write_q.put((batch, runner.submit(fut.result())))
            finished += len(batch)
            if progress is not None:
                progress("features", finished, total)
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        write_q.put(None)
        wthread.join()
        if wpool is not None:
            wpool.shutdown(wait=True)
    if errors:
        raise errors[0]
    return runner.calls
