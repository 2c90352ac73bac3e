"""Permutohedral-lattice Gaussian filtering in pure torch (CPU or GPU, no compiler).

The high-dimensional Gaussian filter of Adams, Baek & Davis, "Fast High-Dimensional Filtering
Using the Permutohedral Lattice", Eurographics 2010, as used by Krähenbühl & Koltun's dense
CRF ("Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011).
Written from the paper; the numerical choices (float32 elevation, rounding ties downwards, the
``[1/2, 1, 1/2]`` blur along the ``d + 1`` lattice axes and the final ``1 / (1 + 2**-d)``
scaling) follow what the MIT-licensed ``pydensecrf`` computes, so both give the same filter up
to float rounding.

The lattice is built once per feature set (:class:`Permutohedral`) and then applied many
times (``filter``): splat, the ``d + 1`` blurs and slice are sparse (CSR) matrix products.
Instead of a hash table, lattice vertices are found by sorting integer keys, and blur
neighbours by binary search in the sorted keys, so everything is vectorised and runs the same
on the CPU and the GPU.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch


def _csr(crow, col, values, shape):
    """A CSR matrix without invariant checks (built here, valid by construction) and without
    the warnings some torch versions give for that: 'in beta' and, on torch 2.11 (seen on a
    GPU machine), 'invariant checks are implicitly disabled ... SEGFAULT'."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class Permutohedral:
    """A permutohedral lattice over ``N`` points with ``d``-dimensional features.

    Parameters
    ----------
    features : (N, d) float32 tensor
        Positions, already divided by the kernel standard deviations (a unit-variance
        Gaussian in this space is what :meth:`filter` approximates).
    """

    def __init__(self, features: torch.Tensor):
        if features.ndim != 2:
            raise ValueError(f"features must be (N, d), got shape {tuple(features.shape)}")
        feats = features.to(torch.float32).T.contiguous()  # (d, N): rows are contiguous
        dev = feats.device
        d, n = feats.shape
        self.n, self.d, self.device = n, d, dev
        d1 = d + 1

        # Elevate onto the hyperplane sum(x) = 0 (Adams et al. p. 5), in float32 like the
        # reference so that rounding decisions agree.
        inv_std = math.sqrt(2.0 / 3.0) * d1
        elevated = torch.empty(d1, n, dtype=torch.float32, device=dev)
        sm = torch.zeros(n, dtype=torch.float32, device=dev)
        for j in range(d, 0, -1):
            cf = feats[j - 1] * float(torch.tensor(inv_std / math.sqrt((j + 1) * j), dtype=torch.float32))
            torch.sub(sm, cf, alpha=j, out=elevated[j])
            sm += cf
        elevated[0] = sm
        del feats, sm, cf

        # Closest remainder-0 point: round each coordinate to a multiple of d+1 (ties down).
        v = elevated * (1.0 / d1)
        up = torch.ceil(v).mul_(d1)
        rem0 = torch.floor(v).mul_(d1)
        rem0 = torch.where(up - elevated < elevated - rem0, up, rem0)
        del v, up
        rsum = torch.round(rem0.sum(0) * (1.0 / d1)).to(torch.int32)

        # Rank of each coordinate's residual (descending; ties go to the later coordinate).
        resid = elevated - rem0
        rank = torch.zeros(d1, n, dtype=torch.int32, device=dev)
        for i in range(d):
            for j in range(i + 1, d1):
                less = resid[i] < resid[j]
                rank[i] += less
                rank[j] += ~less
        rank += rsum
        low, high = rank < 0, rank > d
        rank += (low.to(torch.int32) - high.to(torch.int32)) * d1
        rem0 += (low.to(torch.float32) - high.to(torch.float32)) * d1
        del low, high, rsum

        # Barycentric weights of the d+1 enclosing simplex vertices.
        bary = torch.zeros(d + 2, n, dtype=torch.float32, device=dev)
        torch.sub(elevated, rem0, out=resid).mul_(1.0 / d1)
        for i in range(d1):
            idx = (d - rank[i : i + 1]).long()
            bary.scatter_add_(0, idx, resid[i : i + 1])
            bary.scatter_add_(0, idx + 1, -resid[i : i + 1])
        bary[0] += 1.0 + bary[d + 1]
        weights = bary[:d1].T.contiguous()  # (N, d+1)
        del elevated, resid, bary

        # Vertex r of a point's simplex has key rem0 + canonical[r, rank] on the first d
        # coordinates (the last one is implied by sum = 0), canonical[r, k] = r - (d+1) [k > d - r].
        # Keys are packed into int64 with a mixed radix whose margins leave room for the blur
        # neighbours (+-d on one axis and -+1 on the others).
        rem0i = rem0[:d].to(torch.int64)
        del rem0
        rmin, rmax = rem0i.amin(1).tolist(), rem0i.amax(1).tolist()
        radix = [hi - lo + 4 * d1 + 1 for lo, hi in zip(rmin, rmax, strict=True)]
        if math.prod(float(x) for x in radix) >= 2.0**62:
            raise ValueError("lattice too large to index: filter the image in smaller tiles")
        stride = [1] * d
        for i in range(d - 2, -1, -1):
            stride[i] = stride[i + 1] * radix[i + 1]
        code = torch.zeros(n, dtype=torch.int64, device=dev)
        for i in range(d):
            code += (rem0i[i] - (rmin[i] - 2 * d1)) * stride[i]
        del rem0i
        # Walking r = 0..d every coordinate gains 1 and the one of rank d - r + 1 wraps by -(d+1).
        holder = torch.empty(d1, n, dtype=torch.int64, device=dev)
        holder.scatter_(0, rank.long(), torch.arange(d1, device=dev)[:, None].expand(d1, n))
        del rank
        stride_t = torch.tensor(stride + [0], dtype=torch.int64, device=dev)
        total = sum(stride)
        codes = torch.empty(n, d1, dtype=torch.int64, device=dev)
        codes[:, 0] = code
        for r in range(1, d1):
            code += total - d1 * stride_t[holder[d - r + 1]]
            codes[:, r] = code
        del code, holder

        # Lattice vertices = unique keys.  One (stable) sort of the N (d+1) (point, vertex)
        # entries gives every entry's vertex and groups the entries by vertex, in point order,
        # as the splat matrix needs them.
        sorted_keys, perm = torch.sort(codes.reshape(-1), stable=True)
        del codes
        new = torch.ones_like(sorted_keys, dtype=torch.bool)
        torch.ne(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
        vertex = torch.cumsum(new, 0)
        vertex -= 1
        uniq = sorted_keys[new]
        self.m = m = uniq.numel()
        del sorted_keys, new
        itype = torch.int32 if max(n * d1, 3 * m) < 2**31 else torch.int64

        # Blur neighbours along each of the d+1 lattice axes: key +-d on that axis and -+1 on
        # the others, looked up among the sorted keys (or in a direct table when the key
        # space is small); -1 where the neighbour is not in the lattice.
        span = math.prod(radix)
        table = None
        if span <= 4 * n * d1 + (1 << 20):
            table = torch.full((span,), -1, dtype=torch.int64, device=dev)
            table[uniq] = torch.arange(m, device=dev)
        shifts = torch.tensor([sum((d if i == j else -1) * stride[i] for i in range(d))
                               for j in range(d1)], device=dev)
        targets = (uniq[None, :] + shifts[:, None]).reshape(-1)  # all axes at once
        if table is not None:
            n1s = table[targets]
        else:
            at = torch.searchsorted(uniq, targets).clamp_(max=m - 1)
            n1s = torch.where(uniq[at] == targets, at, -1)
            del at
        del uniq, table, targets
        n1s = n1s.view(d1, m)
        blurs = []
        self_idx = torch.arange(m, device=dev)
        crow = torch.arange(0, 3 * m + 1, 3, device=dev, dtype=itype)
        for n1 in n1s:
            # the relation is symmetric: u = n1(v)  <=>  v = n2(u)
            found = n1 >= 0
            n2 = torch.full_like(n1, -1)
            n2[n1[found]] = self_idx[found]
            # x + (x[n1] + x[n2]) / 2 as an (m x m) CSR matrix with 3 entries per row (uniform
            # rows are the fastest); a missing neighbour holds zero, so its entry points to
            # the vertex itself with weight 0.
            found2 = n2 >= 0
            cols = torch.stack([self_idx, torch.where(found, n1, self_idx),
                                torch.where(found2, n2, self_idx)], 1).to(itype)
            vals = torch.stack([torch.ones(m, device=dev), found * 0.5, found2 * 0.5], 1)
            blurs.append(_csr(crow, cols.reshape(-1), vals.reshape(-1).float(), (m, m)))
        self._blurs = blurs
        del n1s, found, found2, n2, self_idx, cols, vals

        # Splat (m x N) and slice (N x m) as CSR matrices; the slice carries the constant
        # alpha = 1 / (1 + 2^-d) of the reference (Adams et al.'s correction for the blur's
        # extra width).
        alpha = 1.0 / (1.0 + 2.0 ** (-d))
        offsets = torch.empty_like(vertex)
        offsets[perm] = vertex  # (N, d+1): the vertices of each point
        crow = torch.zeros(m + 1, dtype=torch.int64, device=dev)
        torch.cumsum(torch.bincount(vertex, minlength=m), 0, out=crow[1:])
        del vertex
        wflat = weights.reshape(-1)
        self._splat = _csr(crow.to(itype), torch.div(perm, d1, rounding_mode="floor").to(itype),
                           wflat[perm], (m, n))
        del perm
        self._slice = _csr(torch.arange(0, n * d1 + 1, d1, device=dev, dtype=itype),
                           offsets.to(itype), wflat * alpha, (n, m))

    def scaled(self, before: torch.Tensor, after: torch.Tensor) -> Permutohedral:
        """A copy whose :meth:`filter` is ``after * K(before * values)``.

        ``before`` and ``after`` are per-point factors ``(N,)`` (e.g. a symmetric
        normalisation and a kernel weight), folded into the splat and slice matrices so that
        applying them costs nothing; the blur matrices are shared.
        """
        out = copy.copy(self)
        sp, sl = self._splat, self._slice
        col = sp.col_indices()
        out._splat = _csr(sp.crow_indices(), col, sp.values() * before[col.long()], sp.shape)
        out._slice = _csr(sl.crow_indices(), sl.col_indices(),
                          sl.values() * after.repeat_interleave(self.d + 1), sl.shape)
        return out

    def filter(self, values: torch.Tensor, reverse: bool = False,
               add_to: torch.Tensor | None = None) -> torch.Tensor:
        """Gaussian-filter ``values`` (N, C) float32 over the lattice; returns (N, C).

        ``reverse`` blurs the axes in the opposite order (the transpose filter). ``add_to``:
        an (N, C) tensor the result is added to in place (and returned).
        """
        # addmm with beta=0 into preallocated buffers: no zero-fill and no copy per product
        c = values.shape[1]
        alloc = values.new_zeros if values.is_cuda else values.new_empty
        lat, spare = alloc(self.m, c), alloc(self.m, c)
        torch.addmm(lat, self._splat, values, beta=0, out=lat)
        for blur in (reversed(self._blurs) if reverse else self._blurs):
            torch.addmm(spare, blur, lat, beta=0, out=spare)
            lat, spare = spare, lat
        if add_to is not None:
            return torch.addmm(add_to, self._slice, lat, out=add_to)
        out = alloc(self.n, c)
        return torch.addmm(out, self._slice, lat, beta=0, out=out)
