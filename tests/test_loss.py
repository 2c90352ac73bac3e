"""The correlation loss against an independent NumPy computation of the paper's Eqs. 1-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_stego.loss import (LossConfig, correlation, negative_permutation, pair_loss,
                               sample_points, stego_loss)

# ----------------------------------------------------------------- NumPy reference


def np_normalize(a):
    return a / np.maximum(np.sqrt((a**2).sum(1, keepdims=True)), 1e-10)


def np_corr(a, b):
    return np.einsum("nchw,ncij->nhwij", np_normalize(a), np_normalize(b))


def np_pair_loss(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True, stabilize=False):
    fd = np_corr(f1, f2)
    if pointwise:
        fd = fd - fd.mean(axis=(3, 4), keepdims=True) + fd.mean()
    cd = np_corr(c1, c2)
    cd = np.maximum(cd, 0.0 if zero_clamp else -9999.0)
    if stabilize:
        cd = np.minimum(cd, 0.8)
    return -cd * (fd - shift)


def np_pair_loss_grad(f1, f2, c1, c2, shift, pointwise=True):
    """d mean(pair_loss) / d c1 and d c2, zero_clamp on, no stabilize (analytic)."""
    fd = np_corr(f1, f2)
    if pointwise:
        fd = fd - fd.mean(axis=(3, 4), keepdims=True) + fd.mean()
    s = np_corr(c1, c2)
    g = -(fd - shift) * (s > 0) / s.size  # dL/dS
    a_hat, b_hat = np_normalize(c1), np_normalize(c2)
    na = np.sqrt((c1**2).sum(1))  # (B, H, W)
    nb = np.sqrt((c2**2).sum(1))
    grad_a = (np.einsum("nhwij,ncij->nchw", g, b_hat)
              - np.einsum("nhwij,nhwij->nhw", g, s)[:, None] * a_hat) / na[:, None]
    grad_b = (np.einsum("nhwij,nchw->ncij", g, a_hat)
              - np.einsum("nhwij,nhwij->nij", g, s)[:, None] * b_hat) / nb[:, None]
    return grad_a, grad_b


def np_sample(t, coords):
    """Bilinear, align_corners=True, border padding; out[n, :, p, q] at coords[n, q, p]."""
    b, c, h, w = t.shape
    s = coords.shape[1]
    out = np.zeros((b, c, s, s))
    for n in range(b):
        for p in range(s):
            for q in range(s):
                x, y = coords[n, q, p]
                ix = np.clip((x + 1) / 2 * (w - 1), 0, w - 1)
                iy = np.clip((y + 1) / 2 * (h - 1), 0, h - 1)
                x0, y0 = int(np.floor(ix)), int(np.floor(iy))
                x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
                wx, wy = ix - x0, iy - y0
                out[n, :, p, q] = (t[n, :, y0, x0] * (1 - wx) * (1 - wy) + t[n, :, y0, x1] * wx * (1 - wy)
                                   + t[n, :, y1, x0] * (1 - wx) * wy + t[n, :, y1, x1] * wx * wy)
    return out


def np_stego_loss(feats, feats_pos, code, code_pos, cfg, coords1, coords2, perms):
    f1, c1 = np_sample(feats, coords1), np_sample(code, coords1)
    f2, c2 = np_sample(feats_pos, coords2), np_sample(code_pos, coords2)
    flags = dict(pointwise=cfg.pointwise, zero_clamp=cfg.zero_clamp, stabilize=cfg.stabilize)
    self_l = np_pair_loss(f1, f1, c1, c1, cfg.self_shift, **flags).mean()
    knn_l = np_pair_loss(f1, f2, c1, c2, cfg.knn_shift, **flags).mean()
    rand_l = np.concatenate([
        np_pair_loss(f1, np_sample(feats[p], coords2), c1, np_sample(code[p], coords2),
                     cfg.rand_shift, **flags) for p in perms]).mean()
    total = cfg.self_weight * self_l + cfg.knn_weight * knn_l + cfg.rand_weight * rand_l
    return total, self_l, knn_l, rand_l


# --------------------------------------------------------------------------- tests


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3, 12, 7, 9)).astype(np.float32)
    feats_pos = rng.normal(size=(3, 12, 7, 9)).astype(np.float32)
    code = rng.normal(size=(3, 5, 7, 9)).astype(np.float32)
    code_pos = rng.normal(size=(3, 5, 7, 9)).astype(np.float32)
    return feats, feats_pos, code, code_pos


def test_correlation_matches_numpy(maps):
    feats, feats_pos, *_ = maps
    out = correlation(torch.from_numpy(feats), torch.from_numpy(feats_pos[:, :, :4, :6]))
    assert out.shape == (3, 7, 9, 4, 6)
    np.testing.assert_allclose(out.numpy(), np_corr(feats, feats_pos[:, :, :4, :6]), rtol=1e-4, atol=1e-6)


def test_correlation_of_zero_vector_is_zero():
    a = torch.zeros(1, 4, 2, 2)
    b = torch.randn(1, 4, 3, 3)
    assert torch.all(correlation(a, b) == 0)


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("zero_clamp", [True, False])
@pytest.mark.parametrize("stabilize", [True, False])
def test_pair_loss_matches_numpy(maps, pointwise, zero_clamp, stabilize):
    feats, feats_pos, code, code_pos = maps
    t = [torch.from_numpy(x) for x in maps]
    out = pair_loss(t[0], t[1], t[2], t[3], 0.3, pointwise=pointwise, zero_clamp=zero_clamp,
                    stabilize=stabilize)
    ref = np_pair_loss(feats, feats_pos, code, code_pos, 0.3, pointwise, zero_clamp, stabilize)
    assert out.shape == (3, 7, 9, 7, 9)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_pair_loss_gradient_matches_numpy(maps):
    feats, feats_pos, code, code_pos = maps
    c1 = torch.from_numpy(code).requires_grad_()
    c2 = torch.from_numpy(code_pos).requires_grad_()
    pair_loss(torch.from_numpy(feats), torch.from_numpy(feats_pos), c1, c2, 0.2).mean().backward()
    ga, gb = np_pair_loss_grad(feats, feats_pos, code, code_pos, 0.2)
    np.testing.assert_allclose(c1.grad.numpy(), ga, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(c2.grad.numpy(), gb, rtol=1e-3, atol=1e-7)


def test_no_gradient_reaches_features(maps):
    f = torch.from_numpy(maps[0]).requires_grad_()
    c = torch.from_numpy(maps[2]).requires_grad_()
    pair_loss(f, f, c, c, 0.1).mean().backward()
    assert f.grad is None
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_centring_makes_rows_average_to_global_mean(maps):
    feats, feats_pos, code, _ = maps
    f1, f2 = torch.from_numpy(feats), torch.from_numpy(feats_pos)
    ones = torch.ones(3, 2, 7, 9)  # code correlation 1 everywhere -> loss = -(F_sc - shift)
    out = -pair_loss(f1, f2, ones, ones, 0.0)
    raw = correlation(f1, f2)
    row_means = out.mean(dim=(3, 4))
    torch.testing.assert_close(row_means, torch.full_like(row_means, float(raw.mean())), atol=1e-5, rtol=0)
    # without centring the raw correlation comes back
    torch.testing.assert_close(-pair_loss(f1, f2, ones, ones, 0.0, pointwise=False), raw)


def test_zero_clamp_blocks_negative_code_correlations():
    f = torch.randn(1, 6, 4, 4)
    c1 = torch.randn(1, 3, 4, 4, requires_grad=True)
    c2 = (-c1).detach().requires_grad_()  # every code pair anti-aligned at equal positions
    loss = pair_loss(f, f, c1, c2, 0.0)
    s = correlation(c1, c2)
    assert torch.all(loss[s < 0] == 0)
    unclamped = pair_loss(f, f, c1, c2, 0.0, zero_clamp=False)
    assert torch.any(unclamped[s < 0] != 0)


def test_sample_points_matches_numpy(maps):
    feats = maps[0]
    coords = np.random.default_rng(1).uniform(-1.2, 1.2, size=(3, 4, 4, 2)).astype(np.float32)
    out = sample_points(torch.from_numpy(feats), torch.from_numpy(coords))
    np.testing.assert_allclose(out.numpy(), np_sample(feats, coords), rtol=1e-4, atol=1e-5)


def test_stego_loss_matches_numpy(maps):
    cfg = LossConfig(feature_samples=4, neg_samples=3)
    rng = np.random.default_rng(2)
    coords1 = rng.uniform(-1, 1, size=(3, 4, 4, 2)).astype(np.float32)
    coords2 = rng.uniform(-1, 1, size=(3, 4, 4, 2)).astype(np.float32)
    perms = np.array([[1, 2, 0], [2, 0, 1], [1, 0, 0]])
    t = [torch.from_numpy(x) for x in maps]
    out = stego_loss(*t, cfg, coords1=torch.from_numpy(coords1), coords2=torch.from_numpy(coords2),
                     neg_perms=torch.from_numpy(perms))
    ref = np_stego_loss(*maps, cfg, coords1, coords2, perms)
    for got, want in zip((out.total, out.self, out.knn, out.rand), ref):
        np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-7)


def test_stego_loss_default_weights_and_gradient(maps):
    t = [torch.from_numpy(x) for x in maps]
    code = t[2].clone().requires_grad_()
    out = stego_loss(t[0], t[1], code, t[3], generator=torch.Generator().manual_seed(0))
    cfg = LossConfig()
    assert (cfg.self_weight, cfg.knn_weight, cfg.rand_weight) == (0.67, 0.25, 0.63)
    assert (cfg.self_shift, cfg.knn_shift, cfg.rand_shift) == (0.18, 0.12, 0.46)
    want = 0.67 * out.self + 0.25 * out.knn + 0.63 * out.rand
    torch.testing.assert_close(out.total, want)
    out.total.backward()
    assert torch.isfinite(code.grad).all() and code.grad.abs().sum() > 0


def test_stego_loss_is_reproducible_with_generator(maps):
    t = [torch.from_numpy(x) for x in maps]
    a = stego_loss(*t, generator=torch.Generator().manual_seed(5)).total
    b = stego_loss(*t, generator=torch.Generator().manual_seed(5)).total
    c = stego_loss(*t, generator=torch.Generator().manual_seed(6)).total
    assert float(a) == float(b)
    assert float(a) != float(c)


@pytest.mark.parametrize("batch", [2, 3, 5, 16])
def test_negatives_are_never_self(batch):
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        perm = negative_permutation(batch, gen)
        assert perm.shape == (batch,)
        assert not torch.any(perm == torch.arange(batch))
        assert perm.min() >= 0 and perm.max() < batch


def test_negative_of_single_image_is_itself():
    assert negative_permutation(1).tolist() == [0]
