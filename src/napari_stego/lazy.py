"""Lazy segmentation of big images and stacks: dask arrays computed tile by tile.

:func:`predict_dask` turns a fitted :class:`~napari_stego.model.StegoModel` and an
:class:`~napari_stego.io.ImageSource` into dask arrays of cluster probabilities
``(..., K, Y, X)`` and labels ``(..., Y, X)`` (the source's plane axes, then Y and X). One
chunk is one tile core of :class:`~napari_stego.tiling.TileConfig` in one plane; nothing runs
until a chunk is asked for (napari computes the slices it shows; ``da.store`` /
``to_zarr`` write to disk chunk by chunk with flat memory).

A chunk's features come from a :class:`~napari_stego.cache.FeatureStore` when one is given
(complete planes), else from the backbone on the tile plus its halo. Codes are taken one
feature cell beyond the core on every side, so the up-sampling inside a chunk (guided by the
pixels, :func:`~napari_stego.predict.guided_upsample`, or bilinear for model files from
before it) is exactly the up-sampling of the whole map: with cached features, tiled
prediction equals prediction on the assembled feature map.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .appearance import cell_colours, cell_moments
from .errors import Cancelled
from ._device_runner import _autocast
from .features import _Job, _load_job, feature_grid, plane_grid, work_size
from .intensity import IntensityStats
from .io import ImageSource
from .labels import labels_dtype
from .predict import (
    cluster_probabilities,
    cluster_scores,
    guided_probabilities,
    guided_upsample,
    upsample_code,
)
from .tiling import PlaneGrid, Tile, TileConfig, cells

Progress = Callable[[str, int, int], None]


BAND = 256  # pixel rows up-sampled at once: bounds the float32 codes in flight per chunk


def _upsample_band(code: torch.Tensor, ya: int, xa: int, stride: int, rows: tuple[int, int],
                   cols: tuple[int, int]) -> torch.Tensor:
    """Bilinear up-sampling of pixel ``rows`` x ``cols`` of a code map.

    ``code``: ``(1, C, n, m)`` on cells ``[ya, ya + n) x [xa, xa + m)``. Only the cells around
    the band are interpolated, with the same scale as the whole map (exactly ``stride``), so
    the values equal those of up-sampling the whole map wherever the band has a cell of
    margin inside ``code`` (always, except at the image border, where the whole map clamps
    the same way).

    Returns:
        ``(1, C, rows, cols)``.
    """
    n = code.shape[-2]
    c0 = max(rows[0] // stride - 1, ya)
    c1 = min(-(-rows[1] // stride) + 1, ya + n)
    sub = code[:, :, c0 - ya:c1 - ya]
    up = F.interpolate(sub, size=((c1 - c0) * stride, code.shape[-1] * stride), mode="bilinear",
                       align_corners=False)
    return up[..., rows[0] - c0 * stride:rows[1] - c0 * stride,
              cols[0] - xa * stride:cols[1] - xa * stride]


class TilePredictor:
    """Probabilities of one tile core of one plane (the work of one dask chunk).

    The tiles are those of ``grid`` (default: :func:`~napari_stego.features.plane_grid` of
    the model's backbone and ``tiles``; a batch job passes the grid it planned).
    Thread-safe: device work is serialised by ``lock`` (tiles are read and normalised
    outside it, so reading overlaps computing).
    """

    def __init__(self, model, source: ImageSource, stats: IntensityStats, tiles: TileConfig,
                 store=None, *, grid: PlaneGrid | None = None, lock: threading.Lock | None = None,
                 progress: Progress | None = None, total: int = 0, cancel=None) -> None:
        self.model, self.source, self.stats, self.tiles, self.store = model, source, stats, \
            tiles, store
        self.lock = lock or threading.Lock()
        self.progress, self.total, self.cancel = progress, total, cancel
        self.done = 0
        self._count_lock = threading.Lock()
        cfg = model.feature_config
        self.work = work_size(source.shape2d, cfg.min_side)
        self.plane_grid = grid if grid is not None else plane_grid(
            source.shape2d, model.backbone, cfg, tiles)
        self.whole = self.plane_grid.whole
        self.grid = feature_grid(source.shape2d, model.backbone, cfg)

    @property
    def ys(self):
        return self.plane_grid.ys

    @property
    def xs(self):
        return self.plane_grid.xs

    @property
    def chunks_yx(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.plane_grid.chunks

    def _features(self, plane: int, tile: Tile | None, ya: int, yb: int, xa: int,
                  xb: int, colours: bool = True, x: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of cells ``[ya, yb) x [xa, xb)``: ``(1, D, n, m)`` float32 on the device,
        and with ``colours`` the cells' mean colours ``(1, 3, n, m)`` when the model clusters
        with colours (from the pixels read for the backbone; read for them alone when the
        features come from the store), else ``None``. ``x``: the backbone's input, when the
        caller has read it already (a ``whole`` plane's :meth:`_pixels`, a tile's read
        region)."""
        m = self.model
        colours = colours and m.colour_space is not None
        if self._from_store(plane):
            f = torch.from_numpy(np.ascontiguousarray(self.store.read(plane, slice(ya, yb),
                                                                       slice(xa, xb))))
            colours = self._colours(plane, ya, yb, xa, xb) if colours else None
            with self.lock:
                return f.to(m.device, torch.float32)[None], colours
        if x is None:
            x = self._input(plane, tile)
        with self.lock, torch.inference_mode():
            xd = x[None].to(m.device)
            with _autocast(m.device, m.feature_config):
                f = m.backbone(m.backbone.normalize(xd))
            f = f.to(torch.float16).float()  # the cache's precision: same codes either way
        r0 = c0 = 0
        if tile is not None:
            r0, _ = cells(tile.y.read, m.backbone.stride)
            c0, _ = cells(tile.x.read, m.backbone.stride)
        colours = cell_colours(x, tuple(f.shape[-2:]), m.backbone.stride)[None] if colours \
            else None
        crop = (..., slice(ya - r0, yb - r0), slice(xa - c0, xb - c0))
        return f[crop], None if colours is None else colours[crop]

    def _from_store(self, plane: int) -> bool:
        """Whether ``plane``'s features are read from the feature store (complete there)."""
        return self.store is not None and self.store.is_done(plane)

    def _input(self, plane: int, tile: Tile | None) -> torch.Tensor:
        """The backbone's input ``(3, h, w)``: ``tile``'s read region, mapped, or for
        ``None`` the whole work image (the plane up-sampled as for the backbone)."""
        job = _Job(plane, tile, tile.read_shape if tile is not None else tuple(self.work), True)
        return torch.from_numpy(_load_job(self.source, self.stats, job,
                                          self.model.feature_config.min_side))

    def _pixels(self, plane: int, ya: int, yb: int, xa: int, xb: int) -> torch.Tensor:
        """The pixels of cells ``[ya, yb) x [xa, xb)`` as the backbone's input ``(3, P, Q)``
        (those inside the image), read from the source; for a ``whole`` plane, the whole
        work image (the plane up-sampled as for the backbone), whatever the cells."""
        if self.whole:
            return self._input(plane, None)
        s = self.model.backbone.stride
        h, w = self.source.shape2d
        rgb = self.stats.apply(self.source.block(plane, slice(ya * s, min(yb * s, h)),
                                                 slice(xa * s, min(xb * s, w))))
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))

    def _colours(self, plane: int, ya: int, yb: int, xa: int, xb: int) -> torch.Tensor:
        """Mean colours of cells ``[ya, yb) x [xa, xb)``: ``(1, 3, n, m)``, mapped as the
        backbone's input, read from the source (features from the store)."""
        s = self.model.backbone.stride
        x = self._pixels(plane, ya, yb, xa, xb)
        if self.whole:
            return cell_colours(x, self.grid, s)[None, :, ya:yb, xa:xb]
        return cell_colours(x, (yb - ya, xb - xa), s)[None]

    @torch.inference_mode()
    def probs(self, plane: int, iy: int, ix: int) -> np.ndarray:
        """``(K, h, w)`` float32 probabilities of tile ``(iy, ix)``'s core in ``plane``."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("segmentation cancelled")
        m = self.model
        if self.whole and m.predict_config.guide is not None:
            rgb = self._input(plane, None)  # read once, for the backbone and the guidance
            f, _ = self._features(plane, None, 0, self.grid[0], 0, self.grid[1],
                                  colours=False, x=rgb)
            with self.lock:
                p = guided_probabilities(m.head(f), rgb, self.source.shape2d,
                                         m.backbone.stride, m.predict_config,
                                         m.score_parts)[0].cpu()
        elif self.whole:
            f, colours = self._features(plane, None, 0, self.grid[0], 0, self.grid[1])
            centroids, colour = m.score_parts(colours)
            with self.lock:
                code = m.head(f)
                up = upsample_code(code, m.backbone.stride, self.work, self.source.shape2d)
                if colour is not None:  # the colour part, up-sampled as the codes
                    colour = upsample_code(colour, m.backbone.stride, self.work,
                                           self.source.shape2d)
                p = cluster_probabilities(up, centroids, m.predict_config.alpha,
                                          colour)[0].cpu()
        else:
            p = self._tile_probs(plane, self.plane_grid.tile(iy, ix))
        out = p.numpy().astype(np.float32, copy=False)
        if self.progress is not None:
            with self._count_lock:
                self.done += 1
                done = self.done
            self.progress("segment", done, self.total)
        return out

    @torch.inference_mode()
    def window_probs(self, plane: int, tile: Tile) -> np.ndarray:
        """``(K, h, w)`` float32 probabilities of ``tile``'s core, a tile of this grid's
        geometry that need not be one of its tiles (e.g. a core grown for the CRF,
        :meth:`~napari_stego.tiling.PlaneGrid.grown`). Not for ``whole`` planes."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("segmentation cancelled")
        return self._tile_probs(plane, tile).numpy().astype(np.float32, copy=False)

    def _tile_probs(self, plane: int, tile: Tile) -> torch.Tensor:
        """Probabilities of ``tile``'s core from the features of its cells and one cell
        beyond (or the grid's edge), band by band: the scores per cell up-sampled guided by
        the pixels (:func:`~napari_stego.predict.guided_upsample`), or the codes bilinearly
        for ``guide=None``, as on the whole map."""
        m = self.model
        s = m.backbone.stride
        guide = m.predict_config.guide
        sy, sx = tile.y, tile.x
        c_y, c_x = cells(sy.core, s), cells(sx.core, s)
        stored = self._from_store(plane)
        r_y, r_x = ((0, self.grid[0]), (0, self.grid[1])) if stored else \
            (cells(sy.read, s), cells(sx.read, s))
        ya, yb = max(c_y[0] - 1, r_y[0]), min(c_y[1] + 1, r_y[1])
        xa, xb = max(c_x[0] - 1, r_x[0]), min(c_x[1] + 1, r_x[1])
        x = rgb = None
        if guide is not None and not stored:
            # one read for the backbone and the guidance: the tile's read region holds the
            # cells' pixels (its start is a multiple of the stride, its end the cells' or
            # the plane's)
            x = self._input(plane, tile)
            (h, w), (ry, rx) = self.source.shape2d, (sy.read[0], sx.read[0])
            rgb = x[:, ya * s - ry:min(yb * s, h) - ry, xa * s - rx:min(xb * s, w) - rx]
        f, colours = self._features(plane, tile, ya, yb, xa, xb, colours=guide is None, x=x)
        if guide is not None:  # the cells' colours come with the pixels the guidance reads
            if rgb is None:  # features from the store: the pixels are read for the guidance
                rgb = self._pixels(plane, ya, yb, xa, xb)  # pixels from (ya * s, xa * s)
            colours, spread = (t[None].to(m.device)
                               for t in cell_moments(rgb, (yb - ya, xb - xa), s))
        centroids, colour = m.score_parts(colours)
        p = torch.empty(m.n_clusters, sy.core[1] - sy.core[0], sx.core[1] - sx.core[0])
        with self.lock:
            code = m.head(f)
            if guide is not None:
                scores = cluster_scores(code.float(), centroids, colour)
            for q0 in range(sy.core[0], sy.core[1], BAND):
                q1 = min(q0 + BAND, sy.core[1])
                if guide is None:
                    band = cluster_scores(
                        _upsample_band(code, ya, xa, s, (q0, q1), sx.core), centroids,
                        None if colour is None else
                        _upsample_band(colour, ya, xa, s, (q0, q1), sx.core))
                else:
                    px = rgb[None, :, q0 - ya * s:q1 - ya * s,
                             sx.core[0] - xa * s:sx.core[1] - xa * s].to(m.device)
                    band = guided_upsample(scores, colours, spread, px, s, guide,
                                           cells=(ya, xa), pixels=(q0, sx.core[0]))
                p[:, q0 - sy.core[0]:q1 - sy.core[0]] = \
                    torch.softmax(m.predict_config.alpha * band, dim=1)[0].cpu()
        return p


def predict_dask(model, source: ImageSource, stats: IntensityStats, tiles: TileConfig,
                 store=None, *, progress: Progress | None = None, cancel=None):
    """Lazy probabilities and labels of every plane of ``source``.

    Returns:
        ``(labels, probs)``: dask arrays of shape ``(*lead, Y, X)`` (0-based cluster
        indices in :func:`~napari_stego.labels.labels_dtype`) and ``(*lead, K, Y, X)``
        float32, chunked by plane and tile core. ``labels`` is the argmax of ``probs``;
        computing both together computes each tile once.
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    k = model.n_clusters
    lead = source.lead_shape
    lock = getattr(model, "_compute_lock", None)
    pred = TilePredictor(model, source, stats, tiles, store, lock=lock, progress=progress,
                         cancel=cancel)
    cy, cx = pred.chunks_yx
    n_y, n_x = len(cy), len(cx)
    pred.total = source.n_planes * n_y * n_x
    name = "stego-probs-" + uuid.uuid4().hex
    dsk = {}
    for plane in range(source.n_planes):
        idx = source.plane_index(plane)
        for iy in range(n_y):
            for ix in range(n_x):
                key = (name, *idx, 0, iy, ix)
                dsk[key] = (_block, pred, plane, iy, ix, len(lead))
    chunks = tuple((1,) * n for n in lead) + ((k,), cy, cx)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
    probs = da.Array(graph, name, chunks, dtype=np.float32)
    dtype = labels_dtype(k)
    labels = probs.map_blocks(_argmax, dtype=dtype, drop_axis=len(lead))
    return labels, probs


def _block(pred: TilePredictor, plane: int, iy: int, ix: int, n_lead: int) -> np.ndarray:
    p = pred.probs(plane, iy, ix)
    return p.reshape((1,) * n_lead + p.shape)


def _argmax(p: np.ndarray) -> np.ndarray:
    k = p.shape[-3]
    return p.argmax(-3).astype(labels_dtype(k))
