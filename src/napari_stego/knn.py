"""Training windows and their nearest neighbours (STEGO's KNN partners).

A *unit* is a rectangle of one image's feature map: the whole map and its five half-size
crops (four corners and centre, the paper's five-crop), so even a single image offers several
candidates. Each unit is described by its mean feature, L2-normalised; partners are drawn
from each unit's top-k most cosine-similar other units.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def unit_descriptors(maps: Sequence[torch.Tensor], units: Sequence[Unit]) -> torch.Tensor:
    """Mean feature of each unit, L2-normalised: ``(N, D)`` float32."""
    desc = torch.stack([
        maps[u.image][:, u.y:u.y + u.h, u.x:u.x + u.w].float().mean(dim=(1, 2)) for u in units
    ])
    return F.normalize(desc, dim=1)


def knn_table(descriptors: torch.Tensor, k: int = 7) -> torch.Tensor:
    """Indices of each unit's ``k`` most similar *other* units: ``(N, min(k, N-1))`` int64.

    With a single unit the table is ``[[0]]`` (the unit is its own partner).
    """
    n = descriptors.shape[0]
    if n == 1:
        return torch.zeros(1, 1, dtype=torch.long)
    sims = descriptors @ descriptors.T
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(min(k, n - 1), dim=1).indices


def _crop_box(unit: Unit, window: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """A random ``(y, x, h, w)`` box of at most ``window x window`` cells inside ``unit``."""
    ch, cw = min(window, unit.h), min(window, unit.w)
    y = unit.y + int(torch.randint(unit.h - ch + 1, (1,), generator=gen))
    x = unit.x + int(torch.randint(unit.w - cw + 1, (1,), generator=gen))
    return y, x, ch, cw


def crop_window(fmap: torch.Tensor, unit: Unit, window: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``window x window`` crop of ``fmap (D, h, w)`` inside ``unit``.

    Units smaller than the window are cropped as large as they are and resized (bilinear).

    Returns:
        ``(D, window, window)``.
    """
    y, x, ch, cw = _crop_box(unit, window, gen)
    crop = fmap[:, y:y + ch, x:x + cw]
    if ch != window or cw != window:
        crop = F.interpolate(crop[None].float(), size=(window, window), mode="bilinear",
                             align_corners=False)[0].to(fmap.dtype)
    return crop


def _pick_units(n: int, table: torch.Tensor, batch_size: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` of ``n`` units (without replacement when there are enough) and one
    random KNN partner of each: two ``(B,)`` index tensors."""
    if n >= batch_size:
        picks = torch.randperm(n, generator=gen)[:batch_size]
    else:
        picks = torch.randint(n, (batch_size,), generator=gen)
    return picks, table[picks, torch.randint(table.shape[1], (batch_size,), generator=gen)]


def draw_pairs(maps: Sequence[torch.Tensor], units: Sequence[Unit], table: torch.Tensor,
               batch_size: int, window: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: random windows of random units, and a window of a KNN partner of each.

    Units are drawn without replacement when there are enough of them. Training reads only
    the loss's points of these windows, with :func:`draw_pair_points` (same draws).

    Returns:
        ``feats, feats_pos``: two ``(B, D, window, window)`` float32 tensors (CPU).
    """
    picks, partners = _pick_units(len(units), table, batch_size, gen)

    def windows(ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([crop_window(maps[units[i].image], units[i], window, gen)
                            for i in ids.tolist()]).float()

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


def _to_crop(coords: torch.Tensor, size: tuple[int, int], window: int) -> torch.Tensor:
    """Window coordinates ``(..., 2)`` (x, y) -> coordinates in a ``size = (h, w)`` crop that
    :func:`crop_window` would resize to ``window`` (bilinear, ``align_corners=False``)."""
    out = coords.clone()
    for axis, length in ((0, size[1]), (1, size[0])):
        if length == window:
            continue
        u = (coords[..., axis] + 1) / 2 * (window - 1)  # window pixel
        v = ((u + 0.5) * length / window - 0.5).clamp(0, length - 1)  # crop pixel
        out[..., axis] = 2 * v / (length - 1) - 1 if length > 1 else 0.0
    return out


def draw_pair_points(maps: Sequence[torch.Tensor], units: Sequence[Unit], table: torch.Tensor,
                     batch_size: int, window: int, samples: int, gen: torch.Generator) -> PairPoints:
    """A training batch sampled straight from the maps: the windows and partners of
    :func:`draw_pairs` (same draws), read at ``samples x samples`` random points each without
    building the windows (float32 copies of only the cropped cells).
    """
    picks, partners = _pick_units(len(units), table, batch_size, gen)
    boxes = [(units[i].image, _crop_box(units[i], window, gen)) for i in picks.tolist()]
    pboxes = [(units[i].image, _crop_box(units[i], window, gen)) for i in partners.tolist()]
    coords1 = torch.rand(batch_size, samples, samples, 2, generator=gen) * 2 - 1
    coords2 = torch.rand(batch_size, samples, samples, 2, generator=gen) * 2 - 1

    def read(image: int, box, coords: torch.Tensor) -> torch.Tensor:  # -> (1, D, S, k*S)
        y, x, h, w = box
        crop = maps[image][:, y:y + h, x:x + w].float()[None]
        grid = _to_crop(coords, (h, w), window)  # (k, S, S, 2): k point sets, one image
        grid = torch.cat(list(grid.permute(0, 2, 1, 3)), dim=1)[None]  # (1, S, k*S, 2)
        return F.grid_sample(crop, grid, mode="bilinear", padding_mode="border", align_corners=True)

    both = torch.cat([read(im, box, torch.stack([coords1[b], coords2[b]]))
                      for b, (im, box) in enumerate(boxes)])
    partner = torch.cat([read(im, box, coords2[b][None]) for b, (im, box) in enumerate(pboxes)])
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
