"""Backbone features on disk: zarr float16 arrays stamped with everything that made them.

The backbone is the expensive stage; everything after it (KNN, training, clustering,
prediction) reads its output. A :class:`FeatureStore` holds the features of every plane of
one image or stack as an ``(N, D, h, w)`` float16 zarr array (``N`` planes, ``D`` channels,
``h, w`` feature cells) in a folder named by a hash of its *signature*: a fingerprint of the
pixels, the axes and shape, the intensity mapping, the backbone's name and a SHA-256 of its
weights, the feature and tile settings, and the cache format and package versions. Refitting
with another number of clusters or other loss settings finds the same folder and never
recomputes the backbone; changing the data or any of those settings gives another folder.

Planes are marked complete one by one (``done``), so an interrupted extraction resumes where
it stopped. Without a folder the same class works on an in-memory zarr store (micro-sam's
trick: one code path for both).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import StegoError

CACHE_FORMAT = 1
ENV_VAR = "NAPARI_STEGO_CACHEDIR"
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_cache_dir() -> Path:
    """``$NAPARI_STEGO_CACHEDIR``, else ``$XDG_CACHE_HOME/napari-stego/features``, else
    ``~/.cache/napari-stego/features`` (``%LOCALAPPDATA%`` on Windows)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "napari-stego" / "features"


def weights_fingerprint(backbone) -> str:
    """:meth:`Backbone.fingerprint`, computed once per backbone object (it hashes every
    parameter)."""
    value = _FINGERPRINTS.get(backbone)
    if value is None:
        value = _FINGERPRINTS[backbone] = backbone.fingerprint()
    return value


def canonical(signature: dict) -> dict:
    """The signature as it reads back from JSON (tuples become lists, keys sorted)."""
    return json.loads(json.dumps(signature, sort_keys=True, default=str))


def cache_key(signature: dict) -> str:
    """32 hex digits of SHA-256 over the signature's canonical JSON."""
    text = json.dumps(canonical(signature), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def check_disk_space(folder: Path, needed: int, *, margin: int = 512 * 10**6) -> None:
    """Raise a :class:`StegoError` that says what to do when ``needed`` bytes do not fit.

    ``margin`` bytes are kept free for everything else on the disk.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + margin > free:
        raise StegoError(
            f"the feature cache needs {format_bytes(needed)} but {probe} has only "
            f"{format_bytes(free)} free (keeping {format_bytes(margin)} spare): free some space, "
            f"point the cache at a bigger disk (cache=FOLDER or ${ENV_VAR}), or use a backbone "
            "with a larger stride (16-pixel patches need 4x less)"
        )


@dataclass(frozen=True)
class StoreLayout:
    """Shape of a feature store: ``n_planes`` maps of ``(dim, height, width)`` cells, stored
    in chunks of ``(1, dim, chunk, chunk)``."""

    n_planes: int
    dim: int
    height: int
    width: int
    chunk: int

    @property
    def nbytes(self) -> int:
        """Bytes of the float16 features."""
        return self.n_planes * self.dim * self.height * self.width * 2


class FeatureStore:
    """The features of all planes of one source: ``(N, D, h, w)`` float16 in zarr.

    Open one with :meth:`open`. ``read``/``write`` take a plane and cell slices; ``done``
    flags say which planes are complete. Writes from several threads are safe (a write
    holds the locks of the zarr chunks it touches, so two tiles sharing a chunk do not
    undo each other's read-modify-write); ``mark_done`` is for one thread; reads are for
    complete planes.
    """

    def __init__(self, group, layout: StoreLayout, signature: dict, path: Path | None) -> None:
        self.group = group
        self.layout = layout
        self.signature = signature
        self.path = path
        self.features = group["features"]
        self.done_flags = group["done"]
        self._done = np.asarray(self.done_flags[:], dtype=bool)
        self._chunk_locks: dict[tuple[int, int, int], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, folder: str | Path | None, signature: dict, layout: StoreLayout,
             *, check_space: bool = True) -> FeatureStore:
        """Open the store of ``signature`` under ``folder`` (``None``: in memory), making it
        if it does not exist.

        Raises:
            StegoError: not enough disk space for the new features (checked before writing
                anything), or a folder whose stamp does not match (it names the keys).
        """
        import zarr

        signature = canonical(signature)
        if folder is None:
            group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
            cls._create(group, signature, layout)
            return cls(group, layout, signature, None)
        path = Path(folder).expanduser() / f"{cache_key(signature)}.zarr"
        if (path / "zarr.json").exists():
            try:
                group = zarr.open_group(str(path), mode="r+")
                stored = dict(group.attrs.get("signature", {}))
            except Exception:  # a half-created folder: start again
                stored = None
            if stored is not None:
                diff = sorted(k for k in set(stored) | set(signature)
                              if stored.get(k) != signature.get(k))
                if diff:
                    detail = "; ".join(f"{k}: {stored.get(k)!r} != {signature.get(k)!r}"
                                       for k in diff[:4])
                    raise StegoError(f"feature cache {path} was made with other settings "
                                     f"({detail}): delete it to recompute")
                feats = group["features"]
                if tuple(feats.shape) != (layout.n_planes, layout.dim, layout.height,
                                          layout.width):
                    raise StegoError(f"feature cache {path} has shape {feats.shape}, expected "
                                     f"{(layout.n_planes, layout.dim, layout.height, layout.width)}"
                                     ": delete it to recompute")
                stored_chunk = int(feats.chunks[-1])
                layout = StoreLayout(layout.n_planes, layout.dim, layout.height, layout.width,
                                     stored_chunk)
                return cls(group, layout, signature, path)
            shutil.rmtree(path, ignore_errors=True)
        if check_space:
            check_disk_space(path.parent, layout.nbytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(path), mode="w")
        cls._create(group, signature, layout)
        return cls(group, layout, signature, path)

    @staticmethod
    def _create(group, signature: dict, layout: StoreLayout) -> None:
        c = max(1, min(layout.chunk, max(layout.height, layout.width)))
        group.create_array("features", shape=(layout.n_planes, layout.dim, layout.height,
                                              layout.width),
                           chunks=(1, layout.dim, min(c, layout.height), min(c, layout.width)),
                           dtype="float16", compressors=None, fill_value=0)
        group.create_array("done", shape=(layout.n_planes,), chunks=(layout.n_planes,),
                           dtype="uint8", fill_value=0)
        group.attrs["signature"] = signature
        group.attrs["napari_stego"] = dict(cache_format=CACHE_FORMAT, package_version=__version__)

    # ------------------------------------------------------------------------------ data
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.features.shape)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def is_done(self, plane: int) -> bool:
        return bool(self._done[plane])

    def missing(self) -> list[int]:
        """Planes whose features are not complete yet."""
        return [int(i) for i in np.flatnonzero(~self._done)]

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def mark_done(self, plane: int) -> None:
        self._done[plane] = True
        self.done_flags[:] = self._done.astype(np.uint8)

    def write(self, plane: int, ys: slice, xs: slice, feats: np.ndarray) -> None:
        """Store ``(D, h, w)`` features at cells ``ys, xs`` of ``plane`` (thread-safe)."""
        locks = self._locks(plane, ys, xs)
        for lock in locks:  # always in the same (sorted) order: no deadlock
            lock.acquire()
        try:
            self.features[plane, :, ys, xs] = np.asarray(feats, dtype=np.float16)
        finally:
            for lock in reversed(locks):
                lock.release()

    def _locks(self, plane: int, ys: slice, xs: slice) -> list[threading.Lock]:
        """The locks of the chunks that cells ``ys, xs`` of ``plane`` touch, sorted."""
        *_, height, width = self.features.shape
        cy, cx = self.features.chunks[-2:]
        y0, y1, _ = ys.indices(height)
        x0, x1, _ = xs.indices(width)
        keys = [(plane, a, b) for a in range(y0 // cy, max(y0, y1 - 1) // cy + 1)
                for b in range(x0 // cx, max(x0, x1 - 1) // cx + 1)]
        with self._locks_guard:
            return [self._chunk_locks.setdefault(k, threading.Lock()) for k in keys]

    def read(self, plane: int, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        """``(D, h, w)`` float16 features of cells ``ys, xs`` of ``plane``."""
        return np.asarray(self.features[plane, :, ys, xs])

    def to_dask(self):
        """The whole store as an ``(N, D, h, w)`` float16 dask array (lazy)."""
        import dask.array as da

        return da.from_zarr(self.features)

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memory"
        return (f"FeatureStore({where}, shape={self.shape}, "
                f"done={int(self._done.sum())}/{len(self._done)})")


__all__ = [
    "CACHE_FORMAT",
    "FeatureStore",
    "StoreLayout",
    "cache_key",
    "check_disk_space",
    "default_cache_dir",
    "format_bytes",
    "weights_fingerprint",
]
