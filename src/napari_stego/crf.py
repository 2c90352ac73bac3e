"""Dense CRF refinement of cluster probabilities: snap label maps to image edges.

The fully connected CRF of Krähenbühl & Koltun ("Efficient Inference in Fully Connected CRFs
with Gaussian Edge Potentials", NIPS 2011) with the reference STEGO parameters
(``docs/stego-reference.md`` §7.3): unary ``-log(clip(p, 1e-5, 1))``, a Gaussian smoothness
kernel (``pos_w`` 3, ``pos_xy_std`` 1 px), a bilateral appearance kernel (``bi_w`` 4,
``bi_xy_std`` 67 px, ``bi_rgb_std`` 3 grey levels), Potts compatibilities and 10 mean-field
iterations.

Two backends compute the same thing:

* ``"pydensecrf"`` calls the reference C++ implementation (the optional ``pydensecrf2``
  package, ``pip install "napari-stego[crf]"``); single-threaded, about 0.3 Mpx/s.
* ``"torch"`` runs the same mean-field updates on the GPU or the CPU, with no compiler: the
  bilateral kernel through a pure-torch permutohedral lattice that makes the same
  approximation as pydensecrf (:mod:`napari_stego._permutohedral`), the 1-pixel smoothness
  kernel as an exact separable Gaussian (pydensecrf approximates it with a lattice too).
  Labels agree with pydensecrf on more than 99.5 % of pixels.

:func:`dense_crf` refines one image; :func:`dense_crf_tiled` refines a big image tile by tile
with a halo.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np

from ._crf_torch import _POS_CACHE, _run_torch  # noqa: F401  (_POS_CACHE: benchmarks/crf.py)
from .errors import Cancelled, StegoError
from .intensity import IntensityConfig, to_uint8_rgb
from .tiling import PlaneGrid

Progress = Callable[[str, int, int], None]

BACKENDS = ("pydensecrf", "torch")
_INSTALL_HINT = 'pip install pydensecrf2  (or pip install "napari-stego[crf]")'


@dataclass(frozen=True)
class CRFConfig:
    """The dense-CRF energy and its inference (defaults: the reference STEGO CRF).

    ``pos_w`` / ``pos_xy_std``: weight and spatial standard deviation (pixels) of the
    Gaussian smoothness kernel. ``bi_w`` / ``bi_xy_std`` / ``bi_rgb_std``: weight, spatial
    and colour standard deviations of the bilateral kernel; the colour bandwidth is in grey
    levels of the 0-255 image the CRF sees (``intensity`` says how non-uint8 images are
    mapped to it: the same robust percentiles as the features). ``iterations``: mean-field
    steps.
    """

    iterations: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    intensity: IntensityConfig = field(default_factory=IntensityConfig)

    def __post_init__(self):
        if not isinstance(self.iterations, (int, np.integer)) or self.iterations < 0:
            raise StegoError(f"CRF iterations must be an integer >= 0, got {self.iterations!r}")
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
                raise StegoError(f"CRF {name} must be a positive number, got {value!r}")
        for name in ("pos_w", "bi_w"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value >= 0):
                raise StegoError(f"CRF {name} must be a number >= 0, got {value!r}")


_PARAMS = tuple(f.name for f in fields(CRFConfig) if f.name != "intensity")


def with_channels_of(config: CRFConfig, features: IntensityConfig) -> CRFConfig:
    """``config`` for a model whose features map ``features``: when ``config`` names no
    channel mapping and the model's does (multichannel fluorescence, ``fit --channels``),
    the CRF's colour image takes the same three channels (or PCA), which is the only way a
    2- or 4-channel image has colours at all."""
    channels = getattr(features, "channels", None)
    if config.intensity.channels is None and channels is not None:
        return replace(config, intensity=replace(config.intensity, channels=channels))
    return config



def _config(config: CRFConfig | None, params: dict) -> CRFConfig:
    """``config`` (or the defaults) with the keyword parameters that were given."""
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise TypeError(f"unknown CRF parameter(s) {', '.join(unknown)}: use {', '.join(_PARAMS)}")
    config = CRFConfig() if config is None else config
    if not isinstance(config, CRFConfig):
        raise StegoError(f"config must be a CRFConfig, got {type(config).__name__}")
    given = {k: v for k, v in params.items() if v is not None}
    return replace(config, **given) if given else config


# ------------------------------------------------------------------------------ backends
def has_pydensecrf() -> bool:
    """Whether the reference backend (the ``pydensecrf2`` package) can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device=None) -> str:
    """The backend used when none is named.

    ``"torch"`` when a CUDA GPU is available (and ``device`` does not say otherwise),
    otherwise ``"pydensecrf"`` when it is installed, otherwise ``"torch"`` on the CPU.
    """
    import torch

    try:
        dev = None if device is None or str(device) == "auto" else torch.device(device)
    except (RuntimeError, TypeError):
        raise StegoError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev is not None and dev.type == "cuda":
        return "torch"
    if dev is None and torch.cuda.is_available():
        return "torch"
    return "pydensecrf" if has_pydensecrf() else "torch"


def _backend(backend: str | None, device) -> str:
    if backend is None or backend == "auto":
        return default_backend(device)
    if backend not in BACKENDS:
        raise StegoError(f"unknown CRF backend {backend!r}: use one of {', '.join(BACKENDS)} or None (auto)")
    if backend == "pydensecrf":
        if device is not None and str(device) not in ("auto", "cpu"):
            raise StegoError(
                f"the pydensecrf CRF backend runs on the CPU only, not on device {device!r}: "
                "use backend='torch' for a GPU"
            )
        if not has_pydensecrf():
            raise StegoError(f"the pydensecrf CRF backend is not installed: {_INSTALL_HINT}, "
                             "or use backend='torch'")
    return backend


def _torch_device(device):
    import torch

    from .device import resolve_device

    if device is None or str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise StegoError(f"the torch CRF backend runs on 'cpu' or 'cuda', not on {device!r}")
    return dev


# -------------------------------------------------------------------------------- inputs
def crf_image(image, intensity=None) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 image the CRF's colour kernel sees.

    Every image goes through the features' mapping: ``intensity`` is an
    :class:`~napari_stego.intensity.IntensityConfig` (default: the image's own robust
    percentiles, :func:`napari_stego.intensity.to_uint8_rgb`; ``uint8`` divided by 255
    unless dim) or a fitted mapping with an ``apply(block) -> (H, W, 3) float in [0, 1]``
    method (e.g. the stack-wide statistics of :func:`napari_stego.intensity.fit_intensity`,
    so that every slice and tile sees the same colours as the features did). So a ``uint8``
    RGB image that is not dim reaches the CRF as it is.
    """
    arr = np.asarray(image)
    if hasattr(intensity, "apply"):
        rgb = np.round(np.asarray(intensity.apply(arr), np.float32) * 255.0).astype(np.uint8)
    else:
        rgb = to_uint8_rgb(arr, IntensityConfig() if intensity is None else intensity)
    return _owned(rgb, np.uint8)


def _owned(arr: np.ndarray, dtype) -> np.ndarray:
    """``arr`` as a C-contiguous, aligned, writeable array of ``dtype`` in native byte order,
    copied only when it is not one already: the one gate for arrays handed to pydensecrf
    (whose buffers must be writeable) and ``torch.from_numpy`` (which wants writeable,
    native-order memory). Read-only inputs (PIL images, memory maps, napari layers),
    views and big-endian arrays all pass."""
    return np.require(arr, np.dtype(dtype).newbyteorder("="), ["C", "A", "W"])


def _check_probs(probs, shape=None) -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] < 1:
        raise StegoError(f"probs must be (C, H, W) class probabilities, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise StegoError(f"probs must be float probabilities, got dtype {p.dtype}")
    p = _owned(p, np.float32)
    if not np.isfinite(p).all():
        raise StegoError("probs contain NaN or inf: pass finite probabilities in [0, 1]")
    if shape is not None and p.shape[1:] != tuple(shape):
        raise StegoError(
            f"probs have spatial shape {p.shape[1:]} but the image is {tuple(shape)}: up-sample "
            "the probabilities to the image size first"
        )
    return p


def _check_image(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise StegoError(f"image must be (H, W) or (H, W, C), got shape {arr.shape}")
    return arr


# ----------------------------------------------------------------------- the two backends
def _run_pydensecrf(rgb: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """The reference CRF: a direct pydensecrf call (what STEGO's ``dense_crf`` does)."""
    import pydensecrf.densecrf as dcrf

    c, h, w = probs.shape
    unary = -np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=cfg.pos_xy_std, compat=cfg.pos_w)
    crf.addPairwiseBilateral(sxy=cfg.bi_xy_std, srgb=cfg.bi_rgb_std,
                             rgbim=np.ascontiguousarray(rgb), compat=cfg.bi_w)
    q = crf.inference(cfg.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _run(backend, rgb, probs, cfg, device, origin=(0, 0)):
    if backend == "pydensecrf":
        return _run_pydensecrf(rgb, probs, cfg)
    return _run_torch(rgb, probs, cfg, device, origin)


# ---------------------------------------------------------------------------- public API
def dense_crf(image, probs, *, config: CRFConfig | None = None, backend: str | None = None,
              device=None, intensity=None, iterations: int | None = None, pos_w: float | None = None,
              pos_xy_std: float | None = None, bi_w: float | None = None,
              bi_xy_std: float | None = None, bi_rgb_std: float | None = None,
              origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF.

    Parameters
    ----------
    image : (H, W) or (H, W, C) ndarray
        The image the probabilities belong to: uint8 RGB is used as it is; grey, RGBA,
        multi-channel, 16-bit and float images are mapped to 0-255 RGB the way the features
        map them (:func:`crf_image`, ``config.intensity``).
    probs : (K, H, W) float ndarray or torch.Tensor
        Class probabilities at the image's resolution. A tensor (e.g. from a prediction on
        the GPU) stays on its device with the torch backend: no host round trip, and the
        result is a tensor there too.
    config : CRFConfig, optional
        The CRF parameters (default: the reference STEGO CRF); the keyword parameters below
        override single fields.
    backend : {None, "torch", "pydensecrf"}
        ``None`` picks :func:`default_backend`: torch on a CUDA GPU, else pydensecrf when
        installed, else torch on the CPU.
    device : str or torch.device, optional
        Device of the torch backend (default: CUDA when available, else CPU).
    intensity : IntensityStats, optional
        A fitted intensity mapping to use instead of ``config.intensity`` (see
        :func:`crf_image`), e.g. the stack-wide one the features were computed with.
    iterations, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std
        Override the matching :class:`CRFConfig` field (defaults 10, 3, 1, 4, 67, 3).
    origin : (int, int)
        Where ``image``'s top-left pixel lies in a bigger plane, when ``image`` is one window
        of it: the torch backend then lays its bilateral lattice out in the plane's
        coordinates, so that overlapping windows refined one by one agree (as the tiles of
        :func:`dense_crf_tiled` do). pydensecrf ignores it.

    Returns
    -------
    Q : (K, H, W) float32 ndarray (a float32 tensor on ``probs``' device when ``probs`` is one)
        Approximate marginals (they sum to 1 over ``K``); ``Q.argmax(0)`` gives the labels.
        From a CUDA device a numpy result crosses back as float16 (see
        :func:`napari_stego._crf_torch.to_host`).

    Raises
    ------
    StegoError
        Bad shapes or dtypes, an unknown backend, or pydensecrf asked for but not installed.

    Examples
    --------
    >>> q = dense_crf(image, probs)                 # doctest: +SKIP
    >>> labels = q.argmax(0)                        # doctest: +SKIP
    """
    cfg = _config(config, dict(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std,
                               bi_w=bi_w, bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std))
    arr = _check_image(image)
    rgb = crf_image(arr, cfg.intensity if intensity is None else intensity)
    if _is_tensor(probs):
        hint = device if device is not None or backend not in (None, "auto") else probs.device
        backend = _backend(backend, hint)
        p = _check_probs_tensor(probs, arr.shape[:2])
        if backend == "pydensecrf":
            q = _run_pydensecrf(rgb, _owned(p.cpu().numpy(), np.float32), cfg)
            return __import__("torch").from_numpy(q).to(probs.device)
        dev = p.device if device is None else _torch_device(device)
        return _run_torch(rgb, p, cfg, dev, tuple(origin))
    backend = _backend(backend, device)
    p = _check_probs(probs, arr.shape[:2])
    dev = _torch_device(device) if backend == "torch" else None
    return _run(backend, rgb, p, cfg, dev, tuple(origin))


def _is_tensor(x) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_probs_tensor(probs, shape):
    """The checks of :func:`_check_probs` for a tensor, without leaving its device (one
    device read for the finiteness check)."""
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise StegoError(f"probs must be (C, H, W) class probabilities, got shape "
                         f"{tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise StegoError(f"probs must be float probabilities, got dtype {probs.dtype}")
    if tuple(probs.shape[1:]) != tuple(shape):
        raise StegoError(
            f"probs have spatial shape {tuple(probs.shape[1:])} but the image is "
            f"{tuple(shape)}: up-sample the probabilities to the image size first")
    if not bool(probs.isfinite().all()):
        raise StegoError("probs contain NaN or inf: pass finite probabilities in [0, 1]")
    return probs.detach().float()


def default_halo(config: CRFConfig | None = None) -> int:
    """Halo (pixels) added around each tile: twice the bilateral spatial std, at least 16."""
    cfg = CRFConfig() if config is None else config
    return max(16, math.ceil(2 * max(cfg.bi_xy_std, cfg.pos_xy_std)))


def _tile_job(args):
    backend, rgb, probs, cfg, device, origin = args
    return _run(backend, rgb, probs, cfg, device, origin)


def dense_crf_tiled(image, probs, *, tile: int = 1024, halo: int | None = None,
                    config: CRFConfig | None = None, backend: str | None = None, device=None,
                    intensity=None, workers: int | None = None, progress: Progress | None = None,
                    cancel: threading.Event | None = None, **params) -> np.ndarray:
    """:func:`dense_crf` of a big image, tile by tile with a halo.

    Each ``tile`` x ``tile`` block is refined together with a ``halo`` of surrounding pixels
    (default :func:`default_halo`, 2 x ``bi_xy_std``) that is then cropped away, so memory
    stays bounded and seams do not show. The image is mapped to 0-255 once for the whole
    image, so all tiles see the same intensities. Tiles run in this process, one after the
    other by default (torch tiles each use the whole GPU or all CPU threads), never in
    worker processes, so scripts without an ``if __name__ == "__main__":`` guard are safe.
    pydensecrf holds Python's GIL while it runs, so threads do not speed it up
    (docs/benchmarks.md); to refine many images on many cores, use the torch backend or
    ``napari-stego segment --crf --scheduler processes``.

    Parameters
    ----------
    image, probs, config, backend, device, intensity, **params
        As for :func:`dense_crf`.
    tile, halo : int
        Tile side and halo width in pixels.
    workers : int, optional
        Threads that refine tiles at the same time (default 1). They help only where the
        backend releases the GIL and the machine has idle cores (torch with few threads
        per operation); pydensecrf does not release it.
    progress : callable ``(stage, done, total)``, optional
        Called with ``("crf", i, n_tiles)`` after each tile.
    cancel : threading.Event, optional
        Set it to stop between tiles (raises :class:`~napari_stego.errors.Cancelled`).

    Returns
    -------
    Q : (K, H, W) float32 ndarray
    """
    cfg = _config(config, params)
    backend = _backend(backend, device)
    arr = _check_image(image)
    p = _check_probs(probs, arr.shape[:2])
    if int(tile) < 1:
        raise StegoError(f"tile must be a positive number of pixels, got {tile!r}")
    halo = default_halo(cfg) if halo is None else int(halo)
    if halo < 0:
        raise StegoError(f"halo must be >= 0 pixels, got {halo!r}")
    rgb = crf_image(arr, cfg.intensity if intensity is None else intensity)
    dev = _torch_device(device) if backend == "torch" else None
    tiles = PlaneGrid.blocks(arr.shape[:2], int(tile), halo).tiles()
    out = np.empty(p.shape, np.float32)

    def jobs():
        for t in tiles:
            yield (backend, rgb[t.read], p[(slice(None), *t.read)], cfg, dev,
                   (t.y.read[0], t.x.read[0]))

    def store(i, q):
        t = tiles[i]
        out[(slice(None), *t.core)] = q[(slice(None), *t.crop)]
        if progress is not None:
            progress("crf", i + 1, len(tiles))

    n_workers = _workers(workers, len(tiles))
    if n_workers <= 1:
        for i, job in enumerate(jobs()):
            if cancel is not None and cancel.is_set():
                raise Cancelled("CRF cancelled")
            store(i, _tile_job(job))
        return out
    # threads, never processes: a library call must not start interpreters that re-import
    # the caller's __main__ (an unguarded script would run again and die)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n_workers, thread_name_prefix="napari-stego-crf") as pool:
        futures = [pool.submit(_tile_job, job) for job in jobs()]
        try:
            for i, future in enumerate(futures):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("CRF cancelled")
                store(i, future.result())
        finally:
            for future in futures:
                future.cancel()
    return out


def _workers(workers, n_tiles):
    if workers is None:
        return 1
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise StegoError(f"workers must be a positive integer, got {workers!r}")
    return max(1, min(int(workers), n_tiles))
