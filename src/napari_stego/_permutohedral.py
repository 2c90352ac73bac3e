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
Instead of a hash table, lattice vertices are found by sorting integer keys (points that share
a simplex are grouped first), and blur neighbours by binary search in the sorted keys, so
everything is vectorised and runs the same on the CPU and the GPU.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch


def _csr(crow, col, values, shape):
    """A CSR matrix without the 'beta' warning and without invariant checks (built here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class Permutohedral:
    """A permutohedral lattice over ``N`` points with ``d``-dimensional features.

    Parameters
    ----------
    features : (N, d) float32 tensor
        Positions, already divided by the kernel standard deviations (a unit-variance
        Gaussian in this space is what :meth:`filter` approximates).
    reorder : bool
        Number the lattice vertices in the order the points first touch them. Costs a
        little more to build and makes filtering faster when points and vertices are
        spatially coherent (a pixel grid); the result is the same.
    """

    def __init__(self, features: torch.Tensor, reorder: bool = False):
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

        # Vertex r of a simplex has key rem0 + canonical[r, rank] on the first d coordinates
        # (the last one is implied by sum = 0), with canonical[r, k] = r - (d+1) [k > d - r].
        # Keys are packed into int64 with a mixed radix whose margins leave room for the blur
        # neighbours (+-d on one axis and -+1 on the others).
        rem0i = rem0[:d].to(torch.int64)
        del rem0
        rmin, rmax = rem0i.amin(1).tolist(), rem0i.amax(1).tolist()
        radix = [hi - lo + 4 * d1 + 1 for lo, hi in zip(rmin, rmax)]
        if math.prod(float(x) for x in radix) >= 2.0**62:
            raise ValueError("lattice too large to index: filter the image in smaller tiles")
        stride = [1] * d
        for i in range(d - 2, -1, -1):
            stride[i] = stride[i + 1] * radix[i + 1]
        code0 = torch.zeros(n, dtype=torch.int64, device=dev)
        for i in range(d):
            code0 += (rem0i[i] - (rmin[i] - 2 * d1)) * stride[i]
        del rem0i

        # Many points share a simplex (same remainder-0 vertex and rank): group them, so vertex
        # keys are computed and sorted once per simplex, not once per point.
        if math.prod(float(x) for x in radix) * d1**d < 2.0**62:
            skey = code0 * d1**d
            for i in range(d):
                skey += rank[i].to(torch.int64) * d1**i
            sorted_s, perm_s = torch.sort(skey, stable=True)
            del skey
            first = torch.ones(n, dtype=torch.bool, device=dev)
            torch.ne(sorted_s[1:], sorted_s[:-1], out=first[1:])
            del sorted_s
            start_s = torch.nonzero(first)[:, 0]
            n_s = start_s.numel()
            count_s = torch.diff(start_s, append=start_s.new_tensor([n]))
            simplex = torch.empty(n, dtype=torch.int64, device=dev)
            simplex[perm_s] = torch.cumsum(first, 0) - 1
            rep = perm_s[start_s]  # first point of each simplex (the sort is stable)
            del first
            # number simplices in the order of their first point: memory walks follow the points
            order = torch.argsort(rep)
            new_id = torch.empty_like(order)
            new_id[order] = torch.arange(n_s, device=dev)
            simplex = new_id[simplex]
            start_s, count_s, rep = start_s[order], count_s[order], rep[order]
            del order, new_id
        else:  # key space too large to add the rank: one simplex per point
            n_s = n
            perm_s = start_s = simplex = rep = torch.arange(n, device=dev)
            count_s = torch.ones(n, dtype=torch.int64, device=dev)
        self.n_simplices = n_s

        # Vertex keys of each simplex: walking r = 0..d, every coordinate gains 1 and the one of
        # rank d - r + 1 wraps by -(d+1).
        holder = torch.empty(d1, n_s, dtype=torch.int64, device=dev)
        holder.scatter_(0, rank[:, rep].long(),
                        torch.arange(d1, device=dev)[:, None].expand(d1, n_s))
        del rank
        stride_t = torch.tensor(stride + [0], dtype=torch.int64, device=dev)
        total = sum(stride)
        codes = torch.empty(n_s, d1, dtype=torch.int64, device=dev)
        code = code0[rep]
        codes[:, 0] = code
        for r in range(1, d1):
            code = code + total - d1 * stride_t[holder[d - r + 1]]
            codes[:, r] = code
        del code, code0, holder

        # Lattice vertices = unique keys; the sort also groups (simplex, r) items by vertex.
        sorted_v, perm_v = torch.sort(codes.reshape(-1), stable=True)
        del codes
        new = torch.ones_like(sorted_v, dtype=torch.bool)
        torch.ne(sorted_v[1:], sorted_v[:-1], out=new[1:])
        vertex = torch.cumsum(new, 0)
        vertex -= 1
        uniq = sorted_v[new]
        self.m = m = uniq.numel()
        del sorted_v, new
        n_items = n_s * d1
        itype = torch.int32 if max(n * d1, 3 * m) < 2**31 else torch.int64

        # Blur neighbours along each of the d+1 lattice axes: key +-d on that axis and -+1 on
        # the others, looked up among the sorted keys (or in a direct table when the key
        # space is small); -1 where the neighbour is not in the lattice.
        span = math.prod(radix)
        table = None
        if span <= 4 * n * d1 + (1 << 20):
            table = torch.full((span,), -1, dtype=torch.int64, device=dev)
            table[uniq] = torch.arange(m, device=dev)
        neighbours = []
        for j in range(d1):
            shift = sum((d if i == j else -1) * stride[i] for i in range(d))
            target = uniq + shift
            if table is not None:
                n1 = table[target]
            else:
                at = torch.searchsorted(uniq, target).clamp_(max=m - 1)
                n1 = torch.where(uniq[at] == target, at, -1)
            # the relation is symmetric: u = n1(v)  <=>  v = n2(u)
            n2 = torch.full_like(n1, -1)
            found = n1 >= 0
            n2[n1[found]] = torch.arange(m, device=dev)[found]
            neighbours.append([n1, n2])
        del uniq, table, target, found

        if reorder:
            # Number vertices in the order points first touch them (simplices are already in
            # that order), so splat, blur and slice walk memory roughly in image order.
            first = torch.full((m,), n_items, dtype=torch.int64, device=dev)
            first.scatter_reduce_(0, vertex, perm_v, "amin")
            order = torch.argsort(first)
            del first
            old2new = torch.empty(m + 1, dtype=torch.int64, device=dev)
            old2new[order] = torch.arange(m, device=dev)
            old2new[m] = -1  # index -1 (missing) stays -1
            vertex, resort = torch.sort(old2new[vertex], stable=True)
            perm_v = perm_v[resort]
            neighbours = [[old2new[nb[order]] for nb in pair] for pair in neighbours]
            del order, old2new, resort
        del rep

        # Blur matrices: x + (x[n1] + x[n2]) / 2 per axis, (m x m) CSR with 3 entries per row
        # (uniform rows are the fastest); a missing neighbour holds zero, so its entry points to
        # the vertex itself with weight 0.
        self_idx = torch.arange(m, device=dev, dtype=itype)
        crow = torch.arange(0, 3 * m + 1, 3, device=dev, dtype=itype)
        blurs = []
        for n1, n2 in neighbours:
            cols = torch.empty(m, 3, dtype=itype, device=dev)
            vals = torch.empty(m, 3, dtype=torch.float32, device=dev)
            cols[:, 0] = self_idx
            vals[:, 0] = 1.0
            for k, nb in ((1, n1), (2, n2)):
                found = nb >= 0
                cols[:, k] = torch.where(found, nb.to(itype), self_idx)
                vals[:, k] = found
                vals[:, k] *= 0.5
            blurs.append(_csr(crow, cols.reshape(-1), vals.reshape(-1), (m, m)))
        self._blurs = blurs
        del neighbours, self_idx

        # Splat (m x N) and slice (N x m) as CSR matrices; the slice carries the constant
        # alpha = 1 / (1 + 2^-d) of the reference (Adams et al.'s correction for the blur's
        # extra width).  The splat lists, vertex by vertex, the points of every simplex item
        # that touches it: expand each sorted (simplex, r) item into its simplex's points.
        alpha = 1.0 / (1.0 + 2.0 ** (-d))
        item_vertex = torch.empty_like(vertex)
        item_vertex[perm_v] = vertex
        offsets = item_vertex.view(n_s, d1)[simplex]  # (N, d+1) vertex of each point
        del item_vertex, simplex
        item_simplex = torch.div(perm_v, d1, rounding_mode="floor")
        item_r = perm_v - item_simplex * d1
        del perm_v
        lens = count_s[item_simplex]
        ends = torch.cumsum(lens, 0)
        pos = torch.repeat_interleave(start_s[item_simplex] - (ends - lens), lens,
                                      output_size=n * d1)
        pos += torch.arange(n * d1, device=dev)
        del ends, item_simplex, start_s, count_s
        points = perm_s[pos]
        del pos, perm_s
        rr = torch.repeat_interleave(item_r, lens, output_size=n * d1)
        splat_vals = weights.reshape(-1)[points * d1 + rr]
        del rr, item_r
        crow = torch.zeros(m + 1, dtype=torch.int64, device=dev)
        crow[1:].index_add_(0, vertex, lens)
        crow = torch.cumsum(crow, 0)
        del vertex, lens
        self._splat = _csr(crow.to(itype), points.to(itype), splat_vals, (m, n))
        self._slice = _csr(torch.arange(0, n * d1 + 1, d1, device=dev, dtype=itype),
                           offsets.reshape(-1).to(itype), weights.reshape(-1) * alpha, (n, m))

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
