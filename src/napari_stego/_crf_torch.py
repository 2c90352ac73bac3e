"""The torch backend of the dense CRF (:mod:`napari_stego.crf`): mean-field inference of the
reference energy on the GPU or the CPU, the smoothness kernel as an exact separable Gaussian
and the bilateral kernel through the permutohedral lattice of :mod:`._permutohedral`."""

from __future__ import annotations

import math
import threading

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .crf import CRFConfig

_POS_CACHE: dict = {}
_POS_LOCK = threading.Lock()
_MAX_SEPARABLE_RADIUS = 6  # wider smoothness kernels go through the lattice


def _csr(crow, col, values, shape):
    from ._permutohedral import _csr as csr

    return csr(crow, col, values, shape)


def _band(n: int, taps: list[float], device):
    """The (n x n) banded Gaussian ``B[i, i + k] = taps[k + r]`` symmetrically normalised,
    ``b_i B_ij b_j`` with ``b = 1 / sqrt(B 1)``: ``(crow, col, values)`` in int64 / float32."""
    import torch

    r = len(taps) // 2
    i = torch.arange(n, device=device)
    cols = i[:, None] + torch.arange(-r, r + 1, device=device)
    vals = torch.tensor(taps, dtype=torch.float64, device=device).expand(n, -1)
    inside = (cols >= 0) & (cols < n)
    vals = torch.where(inside, vals, 0.0)
    b = torch.rsqrt(vals.sum(1))
    vals = b[:, None] * vals * b[cols.clamp(0, n - 1)]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(inside.sum(1), 0, out=crow[1:])
    return crow, cols[inside], vals[inside].float()


class _GridGaussian:
    """The smoothness message ``w n * G(n * Q)`` with the exact Gaussian on the pixel grid.

    ``G = Gy (x) Gx``, truncated at 3 ``sxy``, is separable and so is its symmetric
    normalisation ``n = 1 / sqrt(G 1) = a(y) b(x)``; each factor, with its normalisation (and
    the weight in ``Gy``), is a banded CSR matrix: ``X`` (N x N) filters along rows, ``Y``
    (H x H) along columns of the ``(H, W * C)`` view. No set-up beyond the matrices, two
    sparse products per iteration.
    """

    def __init__(self, h: int, w: int, sxy: float, weight: float, device):
        import torch

        r = max(1, math.ceil(3 * sxy))
        taps = [math.exp(-0.5 * (k / sxy) ** 2) for k in range(-r, r + 1)]
        self.h, self.w = h, w
        key = ("gauss", h, w, float(sxy), str(device))
        with _POS_LOCK:
            x = _POS_CACHE.get(key)
        if x is None:  # X depends on the shape only: tiles and slices reuse it
            crow, col, val = _band(w, taps, device)
            nnz = col.numel()
            rows = torch.arange(h, device=device)
            crow_x = torch.cat([(rows[:, None] * nnz + crow[None, :-1]).reshape(-1),
                                crow.new_tensor([h * nnz])])
            col_x = (col[None] + rows[:, None] * w).reshape(-1)
            itype = torch.int32 if h * nnz < 2**31 else torch.int64
            x = _csr(crow_x.to(itype), col_x.to(itype), val.repeat(h), (h * w, h * w))
            with _POS_LOCK:
                _POS_CACHE.clear()
                _POS_CACHE[key] = x
        self.x = x
        crow, col, val = _band(h, taps, device)
        self.y = _csr(crow.int(), col.int(), val * weight, (h, h))

    def add_message(self, qt, energy):
        import torch

        h, w, c = self.h, self.w, qt.shape[1]
        xq = torch.empty_like(qt) if not qt.is_cuda else torch.zeros_like(qt)
        torch.addmm(xq, self.x, qt, beta=0, out=xq)
        e = energy.view(h, w * c)
        torch.addmm(e, self.y, xq.view(h, w * c), out=e)


class _LatticeKernel:
    """A message ``w n * K(n * Q)`` through a permutohedral lattice, ``w n`` folded in."""

    def __init__(self, lattice, weight: float, device):
        import torch

        norm = torch.rsqrt(lattice.filter(torch.ones(lattice.n, 1, device=device))[:, 0] + 1e-20)
        self.lattice = lattice.scaled(norm, norm * weight)

    def add_message(self, qt, energy):
        self.lattice.filter(qt, add_to=energy)


def _grid(h, w, y0, x0, device):
    import torch

    ys = torch.arange(y0, y0 + h, dtype=torch.float32, device=device)
    xs = torch.arange(x0, x0 + w, dtype=torch.float32, device=device)
    return xs.repeat(h), ys.repeat_interleave(w)


def _pos_kernel(h, w, sxy, weight, device):
    """The smoothness kernel: exact and separable for the usual narrow ``sxy``, else a
    permutohedral lattice (which depends only on the shape, so the last one is kept)."""
    if math.ceil(3 * sxy) <= _MAX_SEPARABLE_RADIUS:
        return _GridGaussian(h, w, sxy, weight, device)
    key = ("lattice", h, w, float(sxy), str(device))
    with _POS_LOCK:
        lattice = _POS_CACHE.get(key)
    if lattice is None:
        import torch

        from ._permutohedral import Permutohedral

        x, y = _grid(h, w, 0, 0, device)
        lattice = Permutohedral(torch.stack([x / sxy, y / sxy], 1))
        with _POS_LOCK:
            _POS_CACHE.clear()
            _POS_CACHE[key] = lattice
    return _LatticeKernel(lattice, weight, device)


def _run_torch(rgb: np.ndarray, probs: np.ndarray, cfg: CRFConfig, device,
               origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Mean-field inference of the same energy, as pydensecrf runs it.

    ``Q = softmax(-U)``, then ``iterations`` times ``Q = softmax(-U + sum_k w_k n_k K_k(n_k
    Q))`` with each kernel ``K_k`` symmetrically normalised by ``n_k = 1 / sqrt(K_k 1)``
    (Potts compatibility: the message of a label is its own filtered probability).

    ``origin`` is the (row, column) of this tile in a bigger image: the bilateral lattice is
    laid out in whole-image coordinates so that neighbouring tiles share it.
    """
    import torch

    c, h, w = probs.shape
    n = h * w
    with torch.inference_mode():
        unary = to_device(probs, device).reshape(c, n).clamp(1e-5, 1.0).log_().neg_()
        neg_unary = (-unary.T).contiguous()  # (N, C): energies point-major, softmax class-major
        kernels = []
        if cfg.pos_w > 0:
            kernels.append(_pos_kernel(h, w, cfg.pos_xy_std, cfg.pos_w, device))
        if cfg.bi_w > 0:
            from ._permutohedral import Permutohedral

            x, y = _grid(h, w, *origin, device)
            colour = to_device(rgb.reshape(n, 3), device) / cfg.bi_rgb_std
            feats = torch.cat([(x / cfg.bi_xy_std)[:, None], (y / cfg.bi_xy_std)[:, None], colour], 1)
            del x, y, colour
            kernels.append(_LatticeKernel(Permutohedral(feats), cfg.bi_w, device))
            del feats
        q = torch.softmax(-unary, 0)
        del unary
        for _ in range(cfg.iterations):
            qt = q.T.contiguous()
            energy = neg_unary.clone()
            for kernel in kernels:
                kernel.add_message(qt, energy)
            q = torch.softmax(energy.T, 0)
        q = q.reshape(c, h, w)
        return q if isinstance(probs, torch.Tensor) else to_host(q)


def to_device(arr, device):
    """A numpy array or tensor as float32 on ``device``.

    A tensor already there is used as it is (probabilities chained from a prediction on the
    same GPU never visit the host). A numpy array bound for a CUDA device crosses the bus as
    float16 (uint8 stays uint8) from page-locked memory, then is widened there: half the bytes
    of float32, and a pinned copy is not staged through a pageable buffer by the driver.
    """
    import torch

    if isinstance(arr, torch.Tensor):
        return arr.to(device).float()
    t = torch.from_numpy(arr)
    if torch.device(device).type != "cuda":
        return t.to(device).float()
    if t.dtype == torch.float32 or t.dtype == torch.float64:
        t = t.half()
    return t.pin_memory().to(device, non_blocking=True).float()


def to_host(q):
    """CRF marginals ``(K, H, W)`` on any device -> float32 numpy. From a GPU they come back
    as float16 through page-locked memory (half the bytes): the argmax can then differ only
    where two marginals agree to float16's precision (about 1e-3), where the label is a coin
    toss anyway."""
    import torch

    if q.device.type != "cuda":
        return q.numpy() if q.dtype == torch.float32 else q.float().numpy()
    host = torch.empty(q.shape, dtype=torch.float16, pin_memory=True)
    host.copy_(q.half(), non_blocking=True)
    torch.cuda.current_stream(q.device).synchronize()
    return host.float().numpy()
