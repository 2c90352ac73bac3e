"""Training windows and their nearest neighbours (STEGO's KNN partners).

A *unit* is a rectangle of one image's feature map: the whole map and its five half-size
crops (four corners and centre, the paper's five-crop), so even a single image offers several
candidates. Each unit is described by its mean feature, L2-normalised; partners are drawn
from each unit's top-k most cosine-similar other units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Unit:
    """Rectangle ``[y, y + h) x [x, x + w)`` of feature map ``image``."""

    image: int
    y: int
    x: int
    h: int
    w: int


def make_units(shapes: Sequence[tuple[int, int]], crop_ratio: float = 0.5) -> list[Unit]:
    """Whole maps plus five crops of ``crop_ratio`` of each side, for maps of ``(h, w)``."""
    units = []
    for i, (h, w) in enumerate(shapes):
        units.append(Unit(i, 0, 0, h, w))
        ch, cw = max(int(h * crop_ratio), 1), max(int(w * crop_ratio), 1)
        if ch >= h and cw >= w:
            continue
        for y, x in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw),
                     ((h - ch) // 2, (w - cw) // 2)):
            units.append(Unit(i, y, x, ch, cw))
    return units


# the mining reports progress once per chunk: about this many chunks of units for the
# descriptors and of query rows for the table (more rows per chunk never pass
# KNN_CHUNK_ELEMENTS similarities, so an (N, N) matrix is never built for big N)
KNN_PROGRESS_CHUNKS = 8
KNN_CHUNK_ELEMENTS = 2**24


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def descriptor_chunks(n_units: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` unit ranges :func:`unit_descriptors` works (and reports) in."""
    return _chunks(n_units, max(-(-n_units // KNN_PROGRESS_CHUNKS), 1))


def table_chunks(n_units: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` query-row ranges :func:`knn_table` works (and reports) in."""
    size = min(-(-n_units // KNN_PROGRESS_CHUNKS), KNN_CHUNK_ELEMENTS // max(n_units, 1))
    return _chunks(n_units, max(size, 1))


def unit_descriptors(maps: Sequence[torch.Tensor], units: Sequence[Unit],
                     on_chunk: Callable[[], None] | None = None) -> torch.Tensor:
    """Mean feature of each unit, L2-normalised: ``(N, D)`` float32.

    ``on_chunk()`` is called after each of the :func:`descriptor_chunks` (for progress).
    """
    parts = []
    for start, stop in descriptor_chunks(len(units)):
        parts.append(torch.stack([maps[u.image][:, u.y:u.y + u.h, u.x:u.x + u.w].float()
                                  .mean(dim=(1, 2)) for u in units[start:stop]]))
        if on_chunk is not None:
            on_chunk()
    return F.normalize(torch.cat(parts), dim=1)


def knn_table(descriptors: torch.Tensor, k: int = 7,
              on_chunk: Callable[[], None] | None = None) -> torch.Tensor:
    """Indices of each unit's ``k`` most similar *other* units: ``(N, min(k, N-1))`` int64.

    With a single unit the table is ``[[0]]`` (the unit is its own partner). The rows are
    found in the :func:`table_chunks` (``on_chunk()`` after each), so memory stays at
    :data:`KNN_CHUNK_ELEMENTS` similarities however many units there are.
    """
    n = descriptors.shape[0]
    if n == 1:
        if on_chunk is not None:
            on_chunk()
        return torch.zeros(1, 1, dtype=torch.long)
    parts = []
    for start, stop in table_chunks(n):
        sims = descriptors[start:stop] @ descriptors.T
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = -float("inf")  # a unit is not its own neighbour
        parts.append(sims.topk(min(k, n - 1), dim=1).indices)
        if on_chunk is not None:
            on_chunk()
    return torch.cat(parts)


def _crop_box(unit: Unit, window: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """A random ``(y, x, h, w)`` box of at most ``window x window`` cells inside ``unit``."""
    ch, cw = min(window, unit.h), min(window, unit.w)
    y = unit.y + int(torch.randint(unit.h - ch + 1, (1,), generator=gen))
    x = unit.x + int(torch.randint(unit.w - cw + 1, (1,), generator=gen))
    return y, x, ch, cw


def _resized(crop: torch.Tensor, window: int) -> torch.Tensor:
    """``crop (D, h, w)`` resized to ``window x window`` (bilinear) when it is smaller."""
    if crop.shape[-2:] == (window, window):
        return crop
    return F.interpolate(crop[None].float(), size=(window, window), mode="bilinear",
                         align_corners=False)[0].to(crop.dtype)


def crop_window(fmap: torch.Tensor, unit: Unit, window: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``window x window`` crop of ``fmap (D, h, w)`` inside ``unit``.

    Units smaller than the window are cropped as large as they are and resized (bilinear).

    Returns:
        ``(D, window, window)``.
    """
    y, x, ch, cw = _crop_box(unit, window, gen)
    return _resized(fmap[:, y:y + ch, x:x + cw], window)


@dataclass
class PackedMaps:
    """The maps, units and KNN table of a fit as a few tensors on one device, so that a
    training batch is drawn and read with batched tensor operations and no host reads.

    ``cells (sum h_i*w_i, D)``: every map's cells, map after map, row-major (a copy of the
    maps in their dtype); ``offset``, ``width`` ``(M,)``: where map ``i`` starts in ``cells``
    and its width; ``units (N, 5)``: ``image, y, x, h, w`` of every :class:`Unit`;
    ``table``: the KNN table (:func:`knn_table`).
    """

    cells: torch.Tensor
    offset: torch.Tensor
    width: torch.Tensor
    units: torch.Tensor
    table: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.cells.device


def pack_maps(maps: Sequence[torch.Tensor], units: Sequence[Unit], table: torch.Tensor,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedMaps:
    """:class:`PackedMaps` of ``maps`` (``(D, h_i, w_i)`` each) on ``device`` (default: the
    maps' own), cells in ``dtype`` (default: the maps')."""
    device = torch.device(device) if device is not None else maps[0].device
    dtype = dtype or maps[0].dtype
    cells = torch.cat([m.flatten(1).T.to(device=device, dtype=dtype) for m in maps])
    sizes = torch.tensor([m.shape[-2] * m.shape[-1] for m in maps])
    offset = torch.cumsum(sizes, 0) - sizes
    width = torch.tensor([m.shape[-1] for m in maps])
    unit_t = torch.tensor([[u.image, u.y, u.x, u.h, u.w] for u in units], dtype=torch.long)
    return PackedMaps(cells.contiguous(), offset.to(device), width.to(device), unit_t.to(device),
                      table.to(device))


def _draw_boxes(packed: PackedMaps, batch_size: int, window: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of units (without replacement when there are enough), a random KNN partner of
    each, and a random box of at most ``window x window`` cells inside every one of them:
    two ``(B, 5)`` long tensors ``image, y, x, h, w`` (the batch's boxes, the partners')."""
    n, dev = packed.units.shape[0], packed.device
    if n >= batch_size:
        picks = torch.randperm(n, generator=gen, device=dev)[:batch_size]
    else:
        picks = torch.randint(n, (batch_size,), generator=gen, device=dev)
    column = torch.randint(packed.table.shape[1], (batch_size,), generator=gen, device=dev)
    partners = packed.table[picks, column]

    def boxes(ids: torch.Tensor) -> torch.Tensor:
        image, y, x, h, w = packed.units[ids].unbind(1)
        ch, cw = h.clamp(max=window), w.clamp(max=window)
        free = torch.stack([h - ch + 1, w - cw + 1], 1)
        shift = (torch.rand(ids.shape[0], 2, generator=gen, device=dev) * free).long()
        shift = torch.minimum(shift, free - 1)  # rand < 1, but float rounding may round up
        return torch.stack([image, y + shift[:, 0], x + shift[:, 1], ch, cw], 1)

    return boxes(picks), boxes(partners)


def draw_pairs(maps: Sequence[torch.Tensor], units: Sequence[Unit], table: torch.Tensor,
               batch_size: int, window: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: random windows of random units, and a window of a KNN partner of each.

    Units are drawn without replacement when there are enough of them. Training reads only
    the loss's points of these windows, with :func:`draw_pair_points` (same draws).

    Returns:
        ``feats, feats_pos``: two ``(B, D, window, window)`` float32 tensors (CPU).
    """
    picks, partners = _draw_boxes(pack_maps(maps, units, table), batch_size, window, gen)

    def windows(boxes: torch.Tensor) -> torch.Tensor:
        return torch.stack([_resized(maps[i][:, y:y + h, x:x + w], window)
                            for i, y, x, h, w in boxes.tolist()]).float()

    return windows(picks), windows(partners)


@dataclass
class PairPoints:
    """Features of a training batch at the loss's sample points.

    ``anchor1`` / ``anchor2``: ``(B, D, S, S)``, each batch window at ``coords1`` / at
    ``coords2`` (the partners' points, where the window serves as someone's negative);
    ``partner``: ``(B, D, S, S)``, each KNN partner window at ``coords2``. ``coords1``,
    ``coords2``: ``(B, S, S, 2)`` in [-1, 1] window coordinates (x, y), read as
    :func:`~napari_stego.loss.sample_points` reads them.
    """

    anchor1: torch.Tensor
    anchor2: torch.Tensor
    partner: torch.Tensor
    coords1: torch.Tensor
    coords2: torch.Tensor


def _read_points(packed: PackedMaps, boxes: torch.Tensor, coords: torch.Tensor,
                 window: int) -> torch.Tensor:
    """Bilinear samples of the boxes' windows at window coordinates ``coords (B, P, 2)``
    (x, y in [-1, 1]): ``(B, P, D)`` float32.

    A box smaller than the window stands for its crop resized to ``window`` (bilinear,
    ``align_corners=False``, as :func:`crop_window`); the points are read from the crop with
    ``align_corners=True`` and border padding (as :func:`~napari_stego.loss.sample_points`
    reads a window).
    """
    image, y0, x0, h, w = (t[:, None] for t in boxes.unbind(1))
    u = (coords + 1) / 2 * (window - 1)  # window pixels (x, y)

    def axis(u: torch.Tensor, length: torch.Tensor):  # -> (low index, high index, weight)
        v = ((u + 0.5) * length / window - 0.5).clamp(min=0)
        v = torch.minimum(v, (length - 1).to(v.dtype))
        lo = v.floor()
        hi = torch.minimum(lo + 1, (length - 1).to(v.dtype))
        return lo.long(), hi.long(), v - lo

    xl, xh, wx = axis(u[..., 0], w)
    yl, yh, wy = axis(u[..., 1], h)
    base = packed.offset[image] + y0 * packed.width[image] + x0
    row = packed.width[image]
    idx = torch.stack([base + yl * row + xl, base + yl * row + xh,
                       base + yh * row + xl, base + yh * row + xh], -1)  # (B, P, 4)
    corners = packed.cells[idx.flatten()].view(-1, 4, packed.cells.shape[1])  # (B*P, 4, D)
    wts = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], -1)
    out = torch.bmm(wts.view(-1, 1, 4).to(corners.dtype), corners)  # (B*P, 1, D)
    return out.view(*idx.shape[:2], -1).float()


def draw_pair_points(maps: Sequence[torch.Tensor] | PackedMaps, units: Sequence[Unit] | None,
                     table: torch.Tensor | None, batch_size: int, window: int, samples: int,
                     gen: torch.Generator) -> PairPoints:
    """A training batch sampled straight from the maps: the windows and partners of
    :func:`draw_pairs` (same draws), read at ``samples x samples`` random points each without
    building the windows.

    ``maps`` may be :class:`PackedMaps` (then ``units`` and ``table`` are ignored, and
    ``gen`` must be a generator of their device): every draw and read is then a batched
    tensor operation on that device, without reading anything back to the host.
    """
    packed = maps if isinstance(maps, PackedMaps) else pack_maps(maps, units, table)
    dev = packed.device
    boxes, pboxes = _draw_boxes(packed, batch_size, window, gen)
    coords1 = torch.rand(batch_size, samples, samples, 2, generator=gen, device=dev) * 2 - 1
    coords2 = torch.rand(batch_size, samples, samples, 2, generator=gen, device=dev) * 2 - 1

    def grid(values: torch.Tensor, n: int) -> torch.Tensor:
        # (B, n*S*S, D) read at coords[b, q, p] -> (B, D, S, S) at [b, :, p, q], n sets side by side
        out = values.view(batch_size, n, samples, samples, -1).permute(0, 4, 3, 1, 2)
        return out.reshape(batch_size, -1, samples, n * samples)

    both = grid(_read_points(packed, boxes, torch.cat([coords1, coords2], 1).flatten(1, 2),
                             window), 2)
    partner = grid(_read_points(packed, pboxes, coords2.flatten(1, 2), window), 1)
    return PairPoints(both[..., :samples], both[..., samples:], partner, coords1, coords2)


def sample_vectors(maps: Sequence[torch.Tensor], n: int, gen: torch.Generator) -> torch.Tensor:
    """About ``n`` random feature vectors ``(~n, D)`` float32 (at most ``n``, plus one per map
    when there are more maps than ``n``), spread over the maps in proportion to their cells;
    never a copy of all maps at once."""
    cells = torch.tensor([m.shape[-2] * m.shape[-1] for m in maps], dtype=torch.float64)
    per_map = torch.floor(cells / cells.sum() * n).long().clamp(min=1)
    parts = []
    for m, k, c in zip(maps, per_map.tolist(), cells.long().tolist()):
        idx = torch.randperm(c, generator=gen)[: min(k, c)]
        parts.append(m.flatten(1)[:, idx].T.float())
    return torch.cat(parts)
