"""The "images" of KNN mining and training: crops of big feature maps (in memory or in a
feature store), held in RAM or read from the store as training draws its windows.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import numpy as np
import torch

from .tiling import TileConfig, round_up


class _CropLRU:
    """Recently read crops, up to ``max_bytes`` (shared by the lazy crops of one fit)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()
        self.reads = 0

    def get(self, key, load):
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        value = load()
        self.reads += 1
        size = value.element_size() * value.nelement()
        with self.lock:
            if size <= self.max_bytes:
                self.items[key] = value
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    _, old = self.items.popitem(last=False)
                    self.nbytes -= old.element_size() * old.nelement()
        return value


class LazyMap:
    """A crop ``(D, h, w)`` of a stored feature map, read when sliced.

    Looks like a float16 tensor to :mod:`napari_stego.knn` and :mod:`napari_stego.train`:
    ``shape``, ``dtype`` and slicing (which returns a real tensor).
    """

    def __init__(self, store, plane: int, y: int, x: int, h: int, w: int, lru: _CropLRU) -> None:
        self.store, self.plane, self.y, self.x = store, plane, y, x
        self.lru = lru
        self.shape = torch.Size((store.layout.dim, h, w))
        self.dtype = torch.float16

    def load(self) -> torch.Tensor:
        """The whole crop as a tensor."""
        h, w = self.shape[1:]
        return self.lru.get((id(self.store), self.plane, self.y, self.x), lambda: torch.from_numpy(
            self.store.read(self.plane, slice(self.y, self.y + h), slice(self.x, self.x + w))))

    def __getitem__(self, key) -> torch.Tensor:
        return self.load()[key]

    def float(self) -> torch.Tensor:
        return self.load().float()

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.load().to(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyMap(plane={self.plane}, y={self.y}, x={self.x}, shape={tuple(self.shape)})"


def crop_size(window: int, chunk: int | None, tiles: TileConfig) -> int:
    """Cells per side of training crops: ``tiles.train_crop``, else twice the training
    window rounded up to the store's chunk."""
    if tiles.train_crop is not None:
        return int(tiles.train_crop)
    return round_up(2 * window, chunk or 32)


def training_maps(maps: Sequence, window: int, tiles: TileConfig = TileConfig(), *,
                  seed: int = 0) -> list:
    """The "images" training draws its windows from: crops of big feature maps.

    Args:
        maps: ``(D, h, w)`` tensors (in memory) and/or feature stores (every plane of each).
        window: training window in cells (crops are about twice as large).
        tiles: ``train_crop``, ``max_train_crops`` and ``train_ram_mb``.
        seed: picks the crops when there are more than allowed.

    Maps no bigger than twice the crop size per axis stay whole (as small images always did);
    bigger ones are cut by :func:`~napari_stego.tiling.crop_windows`. In-memory maps that
    stay whole are all used, as before. The other entries (crops of big maps, planes of
    stores) are a seeded random subset: ``max_train_crops`` of them, or with ``None`` as many
    as fit ``train_ram_mb`` of float16. Crops of tensors are views; crops of stores are read
    into RAM when their total fits ``train_ram_mb``, else they are :class:`LazyMap` objects
    read as windows are drawn.

    Returns:
        list of ``(D, h_i, w_i)`` tensors or :class:`LazyMap`, in map order.
    """
    from .tiling import crop_windows

    entries, whole = [], []  # (map index, plane, y, x, h, w); kept in-memory whole maps
    for m_idx, m in enumerate(maps):
        if isinstance(m, torch.Tensor):
            size = crop_size(window, None, tiles)
            shapes = [(None, tuple(m.shape[-2:]))]
        else:
            size = crop_size(window, m.layout.chunk, tiles)
            shapes = [(p, (m.layout.height, m.layout.width)) for p in range(m.layout.n_planes)]
        for plane, (h, w) in shapes:
            crops = crop_windows((h, w), size, keep=2 * size)
            for y, x, ch, cw in crops:
                e = (m_idx, plane, y, x, ch, cw)
                (whole if plane is None and len(crops) == 1 else entries).append(e)
    dim = {i: (m.shape[0] if isinstance(m, torch.Tensor) else m.layout.dim)
           for i, m in enumerate(maps)}

    def nbytes(e):
        return dim[e[0]] * e[4] * e[5] * 2

    budget = tiles.train_ram_mb * 2**20
    if tiles.max_train_crops is not None:
        cap = tiles.max_train_crops
    elif entries:
        cap = max(1, int(budget // (sum(map(nbytes, entries)) / len(entries))))
    else:
        cap = 0
    if len(entries) > cap:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(entries), cap, replace=False))
        entries = [entries[i] for i in keep]
    stored = [e for e in entries if not isinstance(maps[e[0]], torch.Tensor)]
    in_ram = sum(map(nbytes, stored)) <= max(budget, 0)
    lru = _CropLRU(min(tiles.train_ram_mb, 512) * 2**20)
    out = []
    for m_idx, plane, y, x, h, w in sorted(whole + entries, key=lambda e: (e[0], e[1] or 0)):
        m = maps[m_idx]
        if isinstance(m, torch.Tensor):
            is_whole = (y, x, h, w) == (0, 0, *m.shape[-2:])
            out.append(m if is_whole else m[:, y:y + h, x:x + w])
        elif in_ram:
            out.append(torch.from_numpy(m.read(plane, slice(y, y + h), slice(x, x + w))))
        else:
            out.append(LazyMap(m, plane, y, x, h, w, lru))
    return out
