"""Automatic shifts: each term attracts the fraction of pairs that belong together."""

import torch

from napari_stego.appearance import AppearanceConfig
from napari_stego.knn import knn_table, make_units, unit_descriptors
from napari_stego.loss import LossConfig
from napari_stego.shifts import (AutoShiftConfig, auto_shifts, choose_shifts, feature_regions,
                                 pair_correlations, same_cluster_rates, sample_pair_points)
from napari_stego.train import TrainConfig, train_head


def maps(offset: float = 0.0, n=4, seed=0):
    """Noise feature maps whose correlation level is raised by a shared offset vector."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(16, 1, 1, generator=g)
    return [(offset * common + torch.randn(16, 12, 12, generator=g)).half() for _ in range(n)]


def two_class_maps(n=4, seed=0, split=9):
    """Maps of two feature prototypes: class 0 left of column ``split``, class 1 right."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(2, 16, generator=g) * 3
    lab = torch.zeros(12, 12, dtype=torch.long)
    lab[:, split:] = 1
    return [(protos[lab].permute(2, 0, 1) + 0.3 * torch.randn(16, 12, 12, generator=g)).half()
            for _ in range(n)], protos


def speckled_maps(n=4, seed=0):
    """The two prototypes of :func:`two_class_maps`, each cell's drawn at random: classes as
    thin and scattered as they come (no regions)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(2, 16, generator=g) * 3
    return [(protos[torch.randint(0, 2, (12, 12), generator=g)].permute(2, 0, 1)
             + 0.3 * torch.randn(16, 12, 12, generator=g)).half() for _ in range(n)]


def samples_of(fmaps, n_batches=4):
    units = make_units([m.shape[-2:] for m in fmaps])
    table = knn_table(unit_descriptors(fmaps, units))
    return units, table, sample_pair_points(fmaps, units, table, window=8, batch_size=4,
                                            feature_samples=5, n_batches=n_batches,
                                            gen=torch.Generator().manual_seed(0))


def test_quantile_rule_sets_attracted_fractions():
    corrs = pair_correlations(samples_of(maps(1.0))[2])
    want = {"self": 0.5, "knn": 0.3, "rand": 0.1}
    shifts = choose_shifts(corrs, want)
    for (term, values), shift in zip(corrs.items(), shifts):
        assert abs(float((values > shift).float().mean()) - want[term]) < 0.01, term


def test_shifts_follow_the_correlation_scale():
    fractions = {"self": 0.5, "knn": 0.4, "rand": 0.1}
    low = choose_shifts(pair_correlations(samples_of(maps(0.0))[2]), fractions)
    high = choose_shifts(pair_correlations(samples_of(maps(3.0))[2]), fractions)
    assert all(h > l + 0.2 for h, l in zip(high, low))


def test_same_cluster_rate_grows_with_a_dominant_class():
    rates = {}
    for split in (6, 10):  # balanced halves, then class 0 on 10 of 12 columns
        fmaps, protos = two_class_maps(split=split)
        centroids = torch.nn.functional.normalize(protos, dim=1)
        rates[split] = same_cluster_rates(samples_of(fmaps)[2], centroids)
    for term in ("self", "knn", "rand"):
        assert 0.45 < rates[6][term] < 0.85, rates
        assert rates[10][term] > rates[6][term] + 0.05, rates


def test_auto_shifts_estimate_fractions_without_labels():
    fmaps, _ = two_class_maps()
    units, table, _ = samples_of(fmaps)
    proxy = AutoShiftConfig(self_attract=None, knn_attract=None, rand_attract=None)
    shifts, report = auto_shifts(fmaps, units, table, n_clusters=2, window=8, batch_size=4,
                                 feature_samples=5, pointwise=True, config=proxy)
    assert set(report["attract"]) == {"self", "knn", "rand"}
    assert all(0.5 < v <= 0.95 for v in report["attract"].values()), report
    fixed, report = auto_shifts(fmaps, units, table, n_clusters=None, window=8, batch_size=4,
                                feature_samples=5, pointwise=True,
                                config=AutoShiftConfig(0.5, 0.4, 0.1))
    assert report["attract"] == {"self": 0.5, "knn": 0.4, "rand": 0.1}


def test_train_records_auto_shifts_and_fixed_ones_stay():
    fmaps = maps(2.0)
    base = TrainConfig(steps=1, batch_size=4, code_dim=4, window=8,
                       loss=LossConfig(feature_samples=5, neg_samples=1))
    auto = train_head(fmaps, base, n_clusters=3)
    assert (auto.loss.self_shift, auto.loss.knn_shift, auto.loss.rand_shift) != (0.18, 0.12, 0.46)
    # noise maps: the features' groups speckle, so the self fraction is the speckle end's
    assert auto.shift_report["regions"]["gate"] == 0.0, auto.shift_report
    assert auto.shift_report["attract"] == {"self": 0.05, "knn": 0.3, "rand": 0.3}
    fixed = train_head(fmaps, TrainConfig(**{**base.__dict__, "auto_shifts": None})).loss
    assert (fixed.self_shift, fixed.knn_shift, fixed.rand_shift) == (0.18, 0.12, 0.46)


def test_feature_regions_tell_regions_from_speckle():
    regions = feature_regions(two_class_maps()[0], 2)
    speckle = feature_regions(speckled_maps(), 2)
    # halves: only the pairs across the border (1 column of 11) disagree
    assert regions["coherence"] > 0.8 and regions["gate"] == 1.0, regions
    assert abs(speckle["coherence"]) < 0.15 and speckle["gate"] == 0.0, speckle


def test_self_fraction_follows_the_features_regions():
    config = AutoShiftConfig()
    got = {}
    for name, fmaps in (("regions", two_class_maps()[0]), ("speckle", speckled_maps())):
        units, table, _ = samples_of(fmaps)
        _, report = auto_shifts(fmaps, units, table, n_clusters=2, window=8, batch_size=4,
                                feature_samples=5, pointwise=True, config=config)
        got[name] = report
    assert got["regions"]["attract"] == {"self": 0.5, "knn": 0.3, "rand": 0.3}, got
    # speckled groups (thin structures): as few attracted self pairs as allowed
    assert got["speckle"]["attract"] == {"self": 0.05, "knn": 0.3, "rand": 0.3}, got
    assert got["speckle"]["regions"]["gate"] == 0.0, got
    # without the speckle end (model files from before it): self_attract there
    units, table, _ = samples_of(speckled_maps())
    _, report = auto_shifts(speckled_maps(), units, table, n_clusters=2, window=8, batch_size=4,
                            feature_samples=5, pointwise=True,
                            config=AutoShiftConfig(speckle_self_attract=None))
    assert report["attract"]["self"] == 0.3, report
    fmaps = two_class_maps()[0]
    units, table, _ = samples_of(fmaps)
    # colour in the target: the classes are stained / bright structures, small ones must stay
    _, report = auto_shifts(fmaps, units, table, n_clusters=2, window=8, batch_size=4,
                            feature_samples=5, pointwise=True, config=config,
                            transform=lambda x: x)  # an appearance teacher
    assert report["attract"]["self"] == 0.3 and "colour" in report["regions"], report
    # off: one fraction for all data
    _, report = auto_shifts(fmaps, units, table, n_clusters=2, window=8, batch_size=4,
                            feature_samples=5, pointwise=True,
                            config=AutoShiftConfig(region_self_attract=None))
    assert report["attract"]["self"] == 0.3 and "regions" not in report, report


def test_a_fit_with_colour_in_its_target_keeps_the_self_fraction():
    fmaps = two_class_maps()[0]
    g = torch.Generator().manual_seed(1)
    # colour channels that split like the features (two colours, left and right)
    colours = [torch.cat([torch.full((3, 12, 9), 0.2), torch.full((3, 12, 3), 0.9)], 2)
               + 0.01 * torch.randn(3, 12, 12, generator=g) for _ in fmaps]
    maps_c = [torch.cat([m, c.half()]) for m, c in zip(fmaps, colours)]
    base = TrainConfig(steps=1, batch_size=4, code_dim=4, window=8,
                       loss=LossConfig(feature_samples=5, neg_samples=1))
    with_colour = train_head(maps_c, TrainConfig(**{**base.__dict__, "appearance":
                                                    AppearanceConfig(weight=0.5)}),
                             n_clusters=2, appearance_channels=3)
    assert with_colour.appearance_report["weight"] == 0.5
    assert with_colour.shift_report["attract"]["self"] == 0.3, with_colour.shift_report
    without = train_head(maps_c, TrainConfig(**{**base.__dict__, "appearance":
                                                AppearanceConfig(weight=0.0)}),
                         n_clusters=2, appearance_channels=3)
    assert without.shift_report["regions"]["gate"] == 1.0, without.shift_report
    assert without.shift_report["attract"]["self"] == 0.5


def test_model_files_from_before_the_regions_rule_load_with_one_fraction():
    import json
    from dataclasses import asdict

    from napari_stego.modelfile import _train_config

    stored = json.loads(json.dumps(asdict(TrainConfig())))  # as a model file holds it
    assert _train_config(stored).auto_shifts == AutoShiftConfig()
    del stored["auto_shifts"]["speckle_self_attract"]
    assert _train_config(stored).auto_shifts == AutoShiftConfig(speckle_self_attract=None)
    del stored["auto_shifts"]["region_self_attract"]
    assert _train_config(stored).auto_shifts == AutoShiftConfig(region_self_attract=None,
                                                                speckle_self_attract=None)
