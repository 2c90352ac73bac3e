"""Automatic shifts: each term attracts the configured fraction of its own pairs."""

import torch

from napari_stego.knn import knn_table, make_units, unit_descriptors
from napari_stego.loss import LossConfig
from napari_stego.shifts import AutoShiftConfig, sample_correlations, shifts_from_correlations
from napari_stego.train import TrainConfig, train_head


def maps(offset: float, n=4, seed=0):
    """Feature maps whose correlation level is set by a shared offset vector."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(16, 1, 1, generator=g)
    return [(offset * common + torch.randn(16, 12, 12, generator=g)).half() for _ in range(n)]


def correlations(fmaps):
    units = make_units([m.shape[-2:] for m in fmaps])
    table = knn_table(unit_descriptors(fmaps, units))
    return sample_correlations(fmaps, units, table, window=8, batch_size=4, feature_samples=5,
                               n_batches=4, gen=torch.Generator().manual_seed(0))


def test_quantile_rule_sets_attracted_fractions():
    corrs = correlations(maps(1.0))
    cfg = AutoShiftConfig(self_attract=0.5, knn_attract=0.3, rand_attract=0.1)
    shifts = shifts_from_correlations(corrs, cfg)
    for (term, values), shift, want in zip(corrs.items(), shifts, (0.5, 0.3, 0.1)):
        assert abs(float((values > shift).float().mean()) - want) < 0.01, term


def test_shifts_follow_the_correlation_scale():
    low = shifts_from_correlations(correlations(maps(0.0)))
    high = shifts_from_correlations(correlations(maps(3.0)))
    assert all(h > l + 0.2 for h, l in zip(high, low))


def test_train_records_auto_shifts_and_fixed_ones_stay():
    fmaps = maps(2.0)
    base = TrainConfig(steps=1, batch_size=4, code_dim=4, window=8,
                       loss=LossConfig(feature_samples=5, neg_samples=1))
    auto = train_head(fmaps, base).loss
    assert (auto.self_shift, auto.knn_shift, auto.rand_shift) != (0.18, 0.12, 0.46)
    fixed = train_head(fmaps, TrainConfig(**{**base.__dict__, "auto_shifts": None})).loss
    assert (fixed.self_shift, fixed.knn_shift, fixed.rand_shift) == (0.18, 0.12, 0.46)
