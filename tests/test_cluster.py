"""Spherical k-means finds planted directions and is deterministic."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_stego.cluster import ClusterConfig, _mean_cosine, assign, spherical_kmeans


def planted(n_per=300, k=4, dim=16, noise=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + noise * torch.randn(k * n_per, dim, generator=g)
    scale = torch.rand(k * n_per, 1, generator=g) * 5 + 0.1  # norms must not matter
    return x * scale, labels, centres


def purity(pred, labels, k):
    conf = np.zeros((k, k))
    np.add.at(conf, (pred.numpy(), labels.numpy()), 1)
    return conf.max(1).sum() / conf.sum()


@pytest.mark.parametrize("batch_size", [100_000, 256])  # full Lloyd and mini-batch paths
def test_recovers_planted_clusters(batch_size):
    x, labels, centres = planted()
    c = spherical_kmeans(x, 4, seed=0, config=ClusterConfig(batch_size=batch_size, n_iter=100))
    assert c.shape == (4, 16)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(4))
    assert purity(assign(x, c), labels, 4) > 0.99
    # each found centroid is close to one planted direction
    assert (c @ centres.T).max(1).values.min() > 0.95


def test_deterministic_with_seed():
    x, _, _ = planted(seed=3)
    cfg = ClusterConfig(batch_size=200, n_iter=30)
    a = spherical_kmeans(x, 5, seed=1, config=cfg)
    b = spherical_kmeans(x, 5, seed=1, config=cfg)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_more_clusters_than_distinct_points():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)
    c = spherical_kmeans(x, 4, seed=0)
    assert c.shape == (4, 2) and torch.isfinite(c).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        spherical_kmeans(torch.zeros(0, 3), 2)
    with pytest.raises(ValueError):
        spherical_kmeans(torch.ones(5, 3), 0)


def _lloyd_step(x, c):
    """One full Lloyd update of unit centroids ``c`` on ``x``."""
    x = F.normalize(x, dim=1)
    onehot = F.one_hot(assign(x, c), c.shape[0]).to(x.dtype)
    return F.normalize(onehot.T @ x, dim=1)


def test_mini_batches_end_at_a_fixed_point():
    """Mini-batch updates (step 1 / count) stop short of a fixed point on overlapping
    clusters; the Lloyd passes after them finish the job: one more full update moves nothing
    and the mean cosine (k-means' objective) is at least as high."""
    x, _, _ = planted(n_per=2000, k=4, dim=8, noise=0.6, seed=5)
    mini = dict(batch_size=256, n_iter=60, n_init=1)
    rough = spherical_kmeans(x, 4, seed=0, config=ClusterConfig(lloyd_iter=0, **mini))
    done = spherical_kmeans(x, 4, seed=0, config=ClusterConfig(**mini))
    assert float((_lloyd_step(x, rough) - rough).norm(dim=1).max()) > 1e-2  # not converged
    assert float((_lloyd_step(x, done) - done).norm(dim=1).max()) < 1e-4
    unit = F.normalize(x, dim=1)
    assert _mean_cosine(unit, done) >= _mean_cosine(unit, rough)
