"""Intensities in, backbone-ready RGB out: how raw pixels (any dtype, 1 to N channels) become
``(H, W, 3)`` floats in [0, 1], robustly (percentiles, NaN and inf left out).

:func:`to_rgb` maps one image by its own statistics; :func:`fit_intensity` measures the
mapping of a whole image or stack once (:class:`IntensityStats`), so every tile and slice
maps alike. Knows nothing about torch or napari; returns new arrays and never modifies its
input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import StegoError

if TYPE_CHECKING:
    from .io import ImageSource

STAT_SAMPLES = 1 << 23  # values read for intensity statistics (all of them when fewer)


@dataclass(frozen=True)
class IntensityConfig:
    """How raw intensities become [0, 1] floats, and channels become the backbone's 3.

    ``uint8`` images are divided by 255 (photographs, already display-ready), unless they
    are dim: every other dtype, and a ``uint8`` image whose upper percentile lies below
    ``dim_uint8 * 255``, is stretched between robust ``percentiles`` computed over the finite
    pixels (NaN and inf are left out of the statistics and become 0).

    ``dim_uint8`` (default 0.5): 8-bit fluorescence is often recorded dim (the Coelho 2009
    Hoechst images: upper percentiles 25-139 of 255, background 0-2), and divided by 255 the
    backbone would see an almost black image. Below half the range such an image maps as the
    same data saved as 16-bit would; photographs, EM and smears (upper percentiles 169-255 on
    the shared sets, but for one dark street frame of 334) keep the plain division.
    ``None``: every ``uint8`` image is divided (model files from before the rule load so).

    ``channels`` says how images with a channel axis become RGB:

    * ``None`` (default): 1 channel is replicated to 3, 3 channels are RGB, 4 are RGBA (alpha
      dropped), all stretched together; any other count is an error asking for one of:
    * ``(a, b, c)``: take these three channel indices as R, G, B (repeats allowed, e.g.
      ``(0, 1, 1)`` for two channels); each channel gets its own percentiles.
    * ``"pca"``: stretch each channel by its own percentiles, project onto the first three
      principal components of the image's (or stack's) pixels, stretch each component by
      its percentiles. Components are ordered by variance; each one's sign makes its largest
      loading positive; with fewer than 3 channels the missing components are 0.
    """

    percentiles: tuple[float, float] = (0.5, 99.5)
    channels: tuple[int, ...] | str | None = None
    dim_uint8: float | None = 0.5

    def __post_init__(self):
        if self.dim_uint8 is not None and not 0.0 < float(self.dim_uint8) <= 1.0:
            raise StegoError(f"dim_uint8 must be None or in (0, 1], got {self.dim_uint8!r}")
        ch = self.channels
        if ch is None or ch == "pca":
            return
        if isinstance(ch, str) or not all(isinstance(c, (int, np.integer)) for c in ch) \
                or len(ch) != 3 or min(ch) < 0:
            raise StegoError(f"channels must be None, 'pca' or three channel indices such as "
                             f"(0, 1, 2), got {ch!r}")
        object.__setattr__(self, "channels", tuple(int(c) for c in ch))


def to_unit_range(image: np.ndarray, config: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """Scale intensities to float32 in [0, 1]; NaN and inf become 0.

    Parameters
    ----------
    image : (H, W) or (H, W, C) ndarray of any real dtype

    Returns
    -------
    (H, W) or (H, W, C) float32 ndarray in [0, 1]
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise StegoError(f"unsupported image dtype {arr.dtype}: use integer or float images")
    if arr.dtype == np.uint8:
        if config.dim_uint8 is not None:
            lo, hi = _robust_range(arr, config.percentiles)
            if _is_dim(hi, config):
                return _stretch(arr, lo, hi)
        return arr.astype(np.float32) / 255.0
    # float64: float32 cannot tell 1e9 from 1e9 + 4 (large offsets, 32/64-bit integers)
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.float32)
    lo, hi = _robust_range(arr[finite], config.percentiles)
    out = _stretch(arr, lo, hi)
    out[~finite] = 0.0
    return out


def to_rgb(image: np.ndarray, config: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """Map a grey or colour image to the 3 channels a backbone (and the CRF) expects.

    Grey (and single-channel) images are replicated to 3 channels; RGBA drops alpha.

    Returns
    -------
    (H, W, 3) float32 ndarray in [0, 1]
    """
    arr = np.asarray(image)
    if config.channels is not None and arr.ndim == 3:
        from .io import ImageSource

        return fit_intensity(ImageSource(arr, "YXC"), config).apply(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2:
        unit = to_unit_range(arr, config)
        return np.repeat(unit[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return to_unit_range(arr, config)
    raise StegoError(
        f"image of shape {arr.shape} is neither grey (H, W) nor RGB (H, W, 3): for "
        f"{arr.shape[-1] if arr.ndim == 3 else '?'} channels pick three with "
        "IntensityConfig(channels=(a, b, c)) or use IntensityConfig(channels='pca')"
    )


def to_uint8_rgb(image: np.ndarray, config: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """The same mapping as :func:`to_rgb`, as (H, W, 3) uint8 (for the CRF and overlays)."""
    return np.round(to_rgb(image, config) * 255.0).astype(np.uint8)


def _sample_regions(source: ImageSource, budget: int) -> list[tuple[int, slice, slice]]:
    """Regions to read for statistics: everything when small, else spread blocks."""
    h, w = source.shape2d
    total = source.n_planes * h * w * source.n_channels
    if total <= budget:
        return [(p, slice(None), slice(None)) for p in range(source.n_planes)]
    n_planes = min(source.n_planes, 32)
    planes = np.unique(np.linspace(0, source.n_planes - 1, n_planes).round().astype(int))
    per_plane = budget // (len(planes) * source.n_channels)
    if h * w <= per_plane:
        return [(int(p), slice(None), slice(None)) for p in planes]
    side = 128
    n_blocks = max(per_plane // (side * side), 1)
    gy = max(int(np.sqrt(n_blocks * h / w)), 1)
    gx = max(n_blocks // gy, 1)
    ys = np.linspace(0, max(h - side, 0), gy).round().astype(int)
    xs = np.linspace(0, max(w - side, 0), gx).round().astype(int)
    return [(int(p), slice(int(y), int(y) + side), slice(int(x), int(x) + side))
            for p in planes for y in ys for x in xs]


def sample_pixels(source: ImageSource, budget: int = STAT_SAMPLES, progress=None) -> np.ndarray:
    """Pixels for intensity statistics: all of them when the source holds at most ``budget``
    values, else blocks spread evenly over (at most 32) planes.

    Returns:
        ``(N, C)`` array in the source's dtype.
    """
    regions = _sample_regions(source, budget)
    out = []
    for i, (p, ys, xs) in enumerate(regions):
        out.append(source.block(p, ys, xs).reshape(-1, source.n_channels))
        if progress is not None:
            progress("statistics", i + 1, len(regions))
    return np.concatenate(out)


def _robust_range(values: np.ndarray, percentiles) -> tuple[float, float]:
    """``to_unit_range``'s rule: percentiles of the finite values, min/max if they tie."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(v, percentiles)
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    return float(lo), float(hi)


def _is_dim(hi: float, config: IntensityConfig) -> bool:
    """Whether ``uint8`` values whose robust upper limit is ``hi`` are stretched, not divided
    by 255 (``IntensityConfig.dim_uint8``)."""
    return config.dim_uint8 is not None and hi < float(config.dim_uint8) * 255.0


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(arr - lo) / (hi - lo)`` clipped to [0, 1], computed in float64 (so large offsets
    keep their small differences), returned as float32 (0 where ``hi == lo``)."""
    span = float(hi) - float(lo)
    scale = 1.0 / span if span > 0 and np.isfinite(span) else 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        out = (np.asarray(arr, np.float64) - float(lo)) * scale
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass
class IntensityStats:
    """The intensity mapping of one image or stack, measured once and applied to every
    block, so all tiles and slices agree (see :func:`fit_intensity`).

    ``mode``: ``"bool"``, ``"uint8"`` (divide by 255), ``"joint"`` (one ``lo, hi`` for all
    channels: grey and RGB), ``"channels"`` (one ``lo, hi`` per picked channel) or ``"pca"``.
    ``channels``: source channels taken, in order (``None``: all).
    ``lo``, ``hi``: ``(k,)`` stretch limits. ``mean``, ``basis``: ``(C,)`` and ``(C, 3)`` of
    the PCA on stretched channels; ``lo``/``hi`` then apply to the 3 components.
    """

    mode: str
    channels: tuple[int, ...] | None
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray | None = None
    basis: np.ndarray | None = None
    chan_lo: np.ndarray | None = None
    chan_hi: np.ndarray | None = None

    def apply(self, block: np.ndarray) -> np.ndarray:
        """Raw ``(h, w, C)`` (or ``(h, w)``) pixels -> ``(h, w, 3)`` float32 in [0, 1]."""
        arr = np.asarray(block)
        if arr.ndim == 2:
            arr = arr[..., None]
        if self.channels is not None:
            arr = arr[..., list(self.channels)]
        if self.mode == "bool":
            out = arr.astype(np.float32)
        elif self.mode == "uint8":
            out = arr.astype(np.float32) / 255.0
        elif self.mode == "joint":
            f = arr.astype(np.float64)
            finite = np.isfinite(f)
            out = _stretch(f, self.lo[0], self.hi[0])
            out[~finite] = 0.0
        else:
            f = arr.astype(np.float64)
            finite = np.isfinite(f)
            if self.chan_lo is not None:  # per-channel stretch of the raw channels
                lo, hi = self.chan_lo, self.chan_hi
            else:
                lo, hi = self.lo, self.hi
            out = np.stack([_stretch(f[..., c], lo[c], hi[c]) for c in range(f.shape[-1])], -1)
            out[~finite] = 0.0
            if self.mode == "pca":
                ok = finite.all(-1)
                comp = (out - self.mean.astype(np.float32)) @ self.basis.astype(np.float32)
                out = np.stack([_stretch(comp[..., k], self.lo[k], self.hi[k])
                                for k in range(comp.shape[-1])], -1)
                out[~ok] = 0.0
        if out.shape[-1] == 1:
            out = np.repeat(out, 3, axis=-1)
        elif out.shape[-1] == 4:
            out = out[..., :3]
        if out.shape[-1] != 3:
            raise StegoError(f"{out.shape[-1]} channels cannot be mapped to RGB")
        return np.ascontiguousarray(out, dtype=np.float32)

    def to_dict(self) -> dict:
        """A JSON-friendly record (for cache signatures)."""
        def arr(a):
            return None if a is None else np.asarray(a, np.float64).round(10).tolist()

        return dict(mode=self.mode, channels=None if self.channels is None else list(self.channels),
                    lo=arr(self.lo), hi=arr(self.hi), mean=arr(self.mean), basis=arr(self.basis),
                    chan_lo=arr(self.chan_lo), chan_hi=arr(self.chan_hi))


def fit_intensity(source: ImageSource, config: IntensityConfig = IntensityConfig(), *,
                  budget: int = STAT_SAMPLES, progress=None) -> IntensityStats:
    """Measure the intensity mapping of a whole image or stack (not per tile).

    Percentiles (and the PCA) come from all pixels when the source holds at most ``budget``
    values — then a 2D image maps exactly as :func:`to_rgb` maps it — else from blocks
    spread over up to 32 planes (:func:`sample_pixels`). A ``uint8`` source is sampled too,
    to tell whether it is dim (``IntensityConfig.dim_uint8``); it is stretched if so, else
    divided by 255 (``mode`` ``"uint8"``).

    Raises:
        StegoError: a channel count that needs ``config.channels``, or a channel index out of
            range.
    """
    c = source.n_channels
    channels = config.channels
    if channels is None:
        if c in (1, 3, 4):
            picks = (0, 1, 2) if c == 4 else None
            mode = "joint"
        else:
            raise StegoError(
                f"the image has {c} channels (axes {source.axes}): pick three with "
                "IntensityConfig(channels=(a, b, c)) or map them with IntensityConfig("
                "channels='pca')"
            )
    elif channels == "pca":
        picks, mode = None, "pca"
    else:
        if max(channels) >= c:
            raise StegoError(f"channels={channels} but the image has only {c} channel(s) "
                             f"(indices 0..{c - 1})")
        picks, mode = tuple(channels), "channels"
    if source.dtype == bool and mode != "pca":
        return IntensityStats("bool", picks, np.zeros(1), np.ones(1))
    uint8 = source.dtype == np.uint8 and mode in ("joint", "channels")
    if uint8 and config.dim_uint8 is None:
        return IntensityStats("uint8", picks, np.zeros(1), np.ones(1))
    samples = sample_pixels(source, budget, progress)
    if picks is not None:
        samples = samples[:, list(picks)]
    joint = _robust_range(samples, config.percentiles) if uint8 or mode == "joint" else None
    if uint8 and not _is_dim(joint[1], config):
        return IntensityStats("uint8", picks, np.zeros(1), np.ones(1))
    if mode == "joint":
        return IntensityStats("joint", picks, np.array([joint[0]]), np.array([joint[1]]))
    f = samples.astype(np.float64)
    ranges = [_robust_range(f[:, k], config.percentiles) for k in range(f.shape[1])]
    lo = np.array([r[0] for r in ranges])
    hi = np.array([r[1] for r in ranges])
    if mode == "channels":
        return IntensityStats("channels", picks, lo, hi)
    # PCA on the stretched channels of pixels finite in every channel
    finite = np.isfinite(f).all(1)
    x = np.stack([_stretch(f[:, k], lo[k], hi[k]) for k in range(c)], -1)[finite]
    if x.shape[0] == 0:
        x = np.zeros((1, c), np.float32)
    mean = x.mean(0).astype(np.float64)
    cov = np.cov((x - mean).T.astype(np.float64)) if x.shape[0] > 1 else np.zeros((c, c))
    cov = np.atleast_2d(cov)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:3]
    basis = np.zeros((c, 3))
    for k, j in enumerate(order):
        v = evecs[:, j]
        basis[:, k] = v if v[np.argmax(np.abs(v))] >= 0 else -v
    comp = (x - mean.astype(np.float32)) @ basis.astype(np.float32)
    cr = [_robust_range(comp[:, k], config.percentiles) for k in range(3)]
    return IntensityStats("pca", None, np.array([r[0] for r in cr]), np.array([r[1] for r in cr]),
                          mean=mean, basis=basis, chan_lo=lo, chan_hi=hi)
