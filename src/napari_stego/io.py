"""Image arrays in, backbone-ready RGB out: axes, dtypes and robust intensity scaling.

Knows nothing about torch or napari. Every public function returns new arrays and never
modifies its input.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import StegoError
from .intensity import (  # noqa: F401  (the intensity mapping, long imported from here)
    STAT_SAMPLES,
    IntensityConfig,
    IntensityStats,
    fit_intensity,
    sample_pixels,
    to_rgb,
    to_uint8_rgb,
    to_unit_range,
)

# the key of napari-stego's own metadata in TIFF descriptions, zarr attributes and model files
META_KEY = "napari_stego"


def image_list(images) -> list[np.ndarray]:
    """Split what a user passes into a list of single 2D images.

    Parameters
    ----------
    images : ndarray or sequence of ndarray
        ``(H, W)`` grey, ``(H, W, 3|4)`` RGB(A), an ``(N, H, W)`` grey stack, an
        ``(N, H, W, 3|4)`` RGB stack, or a list of any of these single images.

    Returns
    -------
    list of ``(H, W)`` or ``(H, W, C)`` arrays (views, not copies).
    """
    if isinstance(images, np.ndarray) or hasattr(images, "__array__") and not isinstance(
        images, (list, tuple)
    ):
        arr = np.asarray(images)
        if arr.ndim == 2 or (arr.ndim == 3 and is_channel_axis(arr.shape)):
            return [_check_size(arr)]
        if arr.ndim in (3, 4):
            if arr.shape[0] == 0:
                raise StegoError(f"no images given: the stack of shape {arr.shape} is empty")
            return [_check_size(arr[i], i) for i in range(arr.shape[0])]
        raise StegoError(
            f"cannot read an image of shape {arr.shape}: pass (H, W), (H, W, 3), "
            "(N, H, W) or (N, H, W, 3) arrays, or a list of 2D images"
        )
    if isinstance(images, Sequence) and len(images) > 0:
        out = []
        for i, im in enumerate(images):
            arr = np.asarray(im)
            if not (arr.ndim == 2 or (arr.ndim == 3 and (arr.shape[-1] == 1
                                                          or is_channel_axis(arr.shape)))):
                raise StegoError(
                    f"image {i} has shape {arr.shape}: each image in a list must be "
                    "(H, W) grey or (H, W, C) with a few channels"
                )
            out.append(_check_size(arr, i))
        return out
    raise StegoError("no images given: pass an array or a non-empty list of arrays")


MAX_CHANNELS = 8  # a last axis this short, and much shorter than the others, is channels


def is_channel_axis(shape: tuple[int, ...]) -> bool:
    """Whether the last axis of a 3D array is channels (``(H, W, C)``) rather than the
    image axis of an ``(N, H, W)`` stack: 3 or 4, or at most :data:`MAX_CHANNELS` and at
    most a quarter of both other axes (a ``(64, 64, 2)`` array is one two-channel image, a
    ``(7, 5, 6)`` one a stack of seven)."""
    c = shape[-1]
    return c in (3, 4) or (c <= MAX_CHANNELS and 4 * c <= min(shape[0], shape[1]))


def _check_size(arr: np.ndarray, index: int | None = None) -> np.ndarray:
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.size == 0:
        which = "the image" if index is None else f"image {index}"
        raise StegoError(f"{which} is empty (shape {arr.shape}): images need at least one pixel")
    return arr


# =============================================================================================
# Big images and stacks: lazily read sources with named axes, stack-wide intensity statistics
# =============================================================================================

LEAD_AXES = "TZQIN"  # axes whose positions become separate planes (time, depth, sequence, ...)


def guess_axes(shape: tuple[int, ...], rgb: bool | None = None) -> str:
    """The axes of an array whose axes were not named.

    ``(Y, X)``; ``(Y, X, C)`` when the last side is 3 or 4 (or ``rgb=True``), or at most
    8 and much shorter than the others (:func:`is_channel_axis`), else ``(Z, Y, X)``;
    ``(Z, Y, X, C)`` when the last side is 3 or 4 (or ``rgb=True``). A
    ``(C, Y, X)`` image, a 4D array without a colour axis last, or anything with more axes
    needs ``axes=`` (napari layers know whether they are RGB: pass ``rgb=layer.rgb``).

    Raises:
        StegoError: the layout cannot be guessed.
    """
    ndim = len(shape)
    colour_last = rgb if rgb is not None else (ndim >= 3 and shape[-1] in (3, 4)
                                               or ndim == 3 and is_channel_axis(shape))
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "YXC" if colour_last else "ZYX"
    if ndim == 4 and colour_last:
        return "ZYXC"
    raise StegoError(
        f"cannot tell the axes of an array of shape {tuple(shape)}: pass axes=, a string with "
        "one letter per axis from Y, X (required), C (channels) and T, Z (planes), e.g. "
        "axes='CYX' or axes='TZYXC'"
    )


def check_axes(axes: str, shape: tuple[int, ...]) -> str:
    """Validate an axes string against a shape; returns it upper-cased (``S`` -> ``C``)."""
    ax = str(axes).upper().replace("S", "C")
    if len(ax) != len(shape):
        raise StegoError(f"axes {axes!r} has {len(ax)} letters but the array has {len(shape)} "
                         f"axes (shape {tuple(shape)})")
    bad = sorted(set(ax) - set("YXC" + LEAD_AXES))
    if bad or len(set(ax)) != len(ax) or "Y" not in ax or "X" not in ax:
        raise StegoError(
            f"axes {axes!r} is not valid: use each letter once, Y and X required, C (or S) for "
            f"channels, and any of {', '.join(LEAD_AXES)} for planes (time, depth, ...)"
        )
    return ax


class RawTiffArray:
    """A contiguous, uncompressed TIFF series read by position, without mapping the file.

    Slicing reads only the requested rows (``os.pread``), so reading tiles of a 20 GB file
    keeps memory flat (a memory map would count every touched page in the process's RSS).
    Supports integer and step-1 slice keys.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype, offset: int) -> None:
        self.path = str(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.offset = int(offset)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._lock = threading.Lock()

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self):
        return dict(path=self.path, shape=self.shape, dtype=self.dtype.str, offset=self.offset)

    def __setstate__(self, state):
        self.__init__(state["path"], tuple(state["shape"]), state["dtype"], state["offset"])

    def _pread(self, n: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fd, n, offset)
        with self._lock:  # pragma: no cover - Windows
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, n)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        starts, stops, squeeze = [], [], []
        for ax, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, (int, np.integer)):
                k = int(k) + n if k < 0 else int(k)
                if not 0 <= k < n:
                    raise IndexError(f"index {k} out of range for axis {ax} of size {n}")
                starts.append(k), stops.append(k + 1), squeeze.append(ax)
            elif isinstance(k, slice):
                a, b, step = k.indices(n)
                if step != 1:
                    raise IndexError("RawTiffArray supports step-1 slices only")
                starts.append(a), stops.append(max(a, b))
            else:
                raise IndexError(f"unsupported index {k!r}")
        out_shape = tuple(b - a for a, b in zip(starts, stops))
        out = np.empty(out_shape, self.dtype)
        if out.size:
            # innermost run: the last partially selected axis and every full axis after it
            k = self.ndim - 1
            while k > 0 and starts[k] == 0 and stops[k] == self.shape[k]:
                k -= 1
            inner = int(np.prod(self.shape[k + 1:], dtype=np.int64))
            run = (stops[k] - starts[k]) * inner
            flat = out.reshape(-1, run)
            strides = np.cumprod((1,) + self.shape[::-1][:-1])[::-1]  # elements per step
            item = self.dtype.itemsize
            for r, idx in enumerate(itertools.product(*(range(a, b) for a, b in
                                                        zip(starts[:k], stops[:k])))):
                first = int(sum(i * s for i, s in zip(idx, strides[:k])) + starts[k] * strides[k])
                raw = self._pread(run * item, self.offset + first * item)
                if len(raw) != run * item:
                    raise StegoError(f"{self.path} is shorter than its TIFF header says: "
                                     "the file may be truncated")
                flat[r] = np.frombuffer(raw, self.dtype)
        return out.reshape(tuple(s for ax, s in enumerate(out_shape) if ax not in squeeze))


def _open_tiff(path: Path):
    """``(array-like, axes)`` of a TIFF's first series, without reading its pixels."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        if not tif.series:
            raise StegoError(f"{path} holds no image series")
        series = tif.series[0]
        axes, shape, offset = series.axes.upper(), tuple(series.shape), series.dataoffset
        # the bytes on disk are in the file's byte order (tifffile's dtype is native)
        dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
    if offset is not None:
        arr = RawTiffArray(path, shape, dtype, offset)
    else:  # compressed or tiled: tifffile's zarr view reads chunk by chunk
        import zarr

        group = zarr.open(tifffile.imread(str(path), aszarr=True, series=0, level=0), mode="r")
        arr = group if hasattr(group, "shape") else group[sorted(group.array_keys())[0]]
    known = set("YXCS" + LEAD_AXES)
    axes = "".join(a if a in known else "Q" for a in axes)
    if "C" in axes and "S" in axes:
        if shape[axes.index("S")] != 1:
            raise StegoError(f"{path} has both C and S axes ({axes}): pass axes= to say which "
                             "is the channel axis")
        axes = axes.replace("S", "Q")
    seen, fixed = set(), []
    for a in axes:  # several unknown axes: name them apart (Q, I, N)
        if a in seen and a in LEAD_AXES:
            a = next(b for b in LEAD_AXES if b not in seen and b not in axes)
        seen.add(a)
        fixed.append(a)
    return arr, "".join(fixed)


class ImageSource:
    """One image or stack, read lazily, seen as ``n_planes`` planes of ``(H, W, C)`` pixels.

    Made by :func:`open_image`. ``axes`` names every axis of ``data`` (``Y``, ``X``, optional
    ``C``, any leading ``T``/``Z``/...); ``data`` is never read as a whole: :meth:`block` reads
    one region of one plane. Planes are numbered in C order over the non-spatial,
    non-channel axes (``lead_shape``).
    """

    def __init__(self, data, axes: str, *, name: str = "", identity: str | None = None) -> None:
        self.data = data
        self.axes = check_axes(axes, tuple(data.shape))
        self.name = name
        self.identity = identity  # a file's path/size/mtime, when the data lives in one
        self.dtype = np.dtype(data.dtype)
        if not (np.issubdtype(self.dtype, np.number) or self.dtype == bool) \
                or np.issubdtype(self.dtype, np.complexfloating):
            raise StegoError(f"unsupported image dtype {self.dtype}: use integer or float images")
        shape = tuple(int(s) for s in data.shape)
        self.shape = shape
        self.lead_axes = "".join(a for a in self.axes if a not in "YXC")
        self.lead_shape = tuple(shape[self.axes.index(a)] for a in self.lead_axes)
        self.n_planes = int(np.prod(self.lead_shape, dtype=np.int64))
        self.height, self.width = shape[self.axes.index("Y")], shape[self.axes.index("X")]
        self.n_channels = shape[self.axes.index("C")] if "C" in self.axes else 1
        if self.height < 1 or self.width < 1 or self.n_planes < 1 or self.n_channels < 1:
            raise StegoError(f"empty image of shape {shape} (axes {self.axes})")

    @property
    def shape2d(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of a per-pixel result (labels): the planes' axes, then ``(Y, X)``."""
        return (*self.lead_shape, self.height, self.width)

    def plane_index(self, plane: int) -> tuple[int, ...]:
        """Index along the leading axes of plane number ``plane``."""
        if not 0 <= plane < self.n_planes:
            raise IndexError(f"plane {plane} out of range ({self.n_planes} planes)")
        return tuple(int(i) for i in np.unravel_index(plane, self.lead_shape)) if self.lead_shape \
            else ()

    def block(self, plane: int, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        """Raw pixels of one region of one plane: ``(h, w, C)`` in the source's dtype."""
        lead = dict(zip(self.lead_axes, self.plane_index(plane)))
        key = tuple(lead[a] if a in lead else ys if a == "Y" else xs if a == "X" else slice(None)
                    for a in self.axes)
        arr = self.data[key]
        if hasattr(arr, "compute"):  # dask
            arr = arr.compute()
        arr = np.asarray(arr)
        kept = [a for a in self.axes if a not in lead]  # order of the remaining axes
        if "C" not in kept:
            arr, kept = arr[..., None], kept + ["C"]
        return np.transpose(arr, [kept.index(a) for a in "YXC"])

    def __repr__(self) -> str:
        return (f"ImageSource({self.name or type(self.data).__name__}, axes={self.axes!r}, "
                f"shape={self.shape}, dtype={self.dtype})")


TIFF_FILE_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")  # paths open_image reads as TIFF


def open_image(data, axes: str | None = None, *, rgb: bool | None = None,
               name: str | None = None) -> ImageSource:
    """A lazily read :class:`ImageSource` from an array, a dask / zarr array or a TIFF file.

    Parameters
    ----------
    data : ndarray, dask array, zarr array, path to a TIFF / OME-TIFF, or an ImageSource
        Nothing is read now. TIFFs are opened without reading pixels: contiguous
        uncompressed series are read by position, others through tifffile's zarr view.
    axes : str, optional
        One letter per axis of ``data``: ``Y`` and ``X``, optionally ``C`` (or ``S``) for
        channels, and ``T``, ``Z`` (or ``Q``, ``I``, ``N``) for planes, e.g. ``"YX"``,
        ``"YXC"``, ``"ZYX"``, ``"TYXC"``, ``"CYX"``. Default: the TIFF's own axes, or
        :func:`guess_axes`.
    rgb : bool, optional
        Whether the last axis is colour (napari's ``layer.rgb``); used only to guess axes.

    Raises
    ------
    StegoError
        Axes that do not fit, an unreadable file, an unsupported dtype.
    """
    if isinstance(data, ImageSource):
        if axes is not None and check_axes(axes, data.shape) != data.axes:
            raise StegoError(f"the source's axes are {data.axes!r}, not {axes!r}")
        return data
    identity = None
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise StegoError(f"image file {path} does not exist")
        if path.is_dir() or path.suffix == ".zarr":
            import zarr

            arr = zarr.open(str(path), mode="r")
            if not hasattr(arr, "shape"):
                raise StegoError(f"{path} is a zarr group: pass the array inside it")
            file_axes = None
        elif path.suffix.lower() in TIFF_FILE_SUFFIXES:
            try:
                arr, file_axes = _open_tiff(path)
            except StegoError:
                raise
            except Exception as exc:
                raise StegoError(f"cannot read {path} as a TIFF: {exc}") from None
        else:
            raise StegoError(f"cannot open {path}: pass a TIFF / OME-TIFF, a .zarr array, or "
                             "an array")
        st = path.stat()
        identity = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        name = name or path.name
        if axes is None:
            axes = file_axes or guess_axes(arr.shape, rgb)
        return ImageSource(arr, axes, name=name, identity=identity)
    if not hasattr(data, "shape") or not hasattr(data, "__getitem__"):
        data = np.asarray(data)
    if axes is None:
        axes = guess_axes(tuple(data.shape), rgb)
    return ImageSource(data, axes, name=name or "")


# ------------------------------------------------------------------------- fingerprints


def data_fingerprint(source: ImageSource, mode: str = "auto") -> str:
    """A hash that changes when the pixels change (for feature-cache keys).

    ``mode="full"`` hashes every pixel (plane by plane, memory flat); ``"sample"`` hashes
    the file's identity (path, size, modification time) when there is a file, plus blocks
    spread over every plane (at most 256 planes; a change that touches none of them and no
    file metadata goes unnoticed); ``"auto"`` is ``"full"`` for in-memory numpy arrays and
    sources of at most 64 M values, else ``"sample"``.
    """
    if mode not in ("auto", "full", "sample"):
        raise StegoError(f"data_hash must be 'auto', 'full' or 'sample', got {mode!r}")
    h, w = source.shape2d
    total = source.n_planes * h * w * source.n_channels
    if mode == "auto":
        mode = "full" if isinstance(source.data, np.ndarray) or total <= (1 << 26) else "sample"
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr((source.shape, source.axes, source.dtype.str, mode)).encode())
    if mode == "full":
        for p in range(source.n_planes):
            digest.update(np.ascontiguousarray(source.block(p)).tobytes())
        return digest.hexdigest()
    if source.identity:
        digest.update(source.identity.encode())
    planes = np.unique(np.linspace(0, source.n_planes - 1, min(source.n_planes, 256)).round())
    side = 32
    ys = np.linspace(0, max(h - side, 0), 4).round().astype(int)
    xs = np.linspace(0, max(w - side, 0), 4).round().astype(int)
    for p in planes.astype(int):
        for y in ys:
            for x in xs:
                block = source.block(int(p), slice(int(y), int(y) + side), slice(int(x), int(x) + side))
                digest.update(np.ascontiguousarray(block).tobytes())
    return digest.hexdigest()
