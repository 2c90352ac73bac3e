"""The appearance affinity: cell colours, the label-free weight rule, the blended teacher."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from napari_stego import StegoError
from napari_stego.appearance import (
    AppearanceConfig,
    AppearanceTeacher,
    appearance_map,
    appearance_weight,
    coherence,
    median_distance,
)

AUTO = AppearanceConfig(weight=None)  # the rule (the package default is off)
COLOURS = np.array([[0.9, 0.2, 0.3], [0.3, 0.3, 0.8], [0.95, 0.9, 0.85]])


def blob_labels(rng, size=96, k=3):
    """Random smooth regions with ``k`` classes."""
    field = gaussian_filter(rng.standard_normal((k, size, size)), (0, 8, 8))
    return field.argmax(0)


def maps_of(images, stride=8):
    return [appearance_map(im, (im.shape[0] // stride, im.shape[1] // stride), stride,
                           im.shape[:2]) for im in images]


def test_appearance_map_is_the_mean_colour_of_each_cell():
    image = np.zeros((32, 48, 3), np.float32)
    image[:, :24] = (1.0, 0.0, 0.0)
    image[:, 24:] = (0.0, 0.5, 1.0)
    image[:8, :8] = 0.25
    out = appearance_map(image, (4, 6), 8, (32, 48))
    assert out.shape == (3, 4, 6)
    torch.testing.assert_close(out[:, 0, 0], torch.full((3,), 0.25))
    torch.testing.assert_close(out[:, 1, 1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[:, 3, 5], torch.tensor([0.0, 0.5, 1.0]))
    # a grid bigger than the image: padded as the backbone pads (replicate)
    padded = appearance_map(image[:30, :46], (4, 6), 8, (30, 46))
    torch.testing.assert_close(padded[:, 3, 5], torch.tensor([0.0, 0.5, 1.0]))


def test_rule_gives_a_large_weight_when_colour_defines_the_classes():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        lab = blob_labels(rng)
        images.append(np.clip(COLOURS[lab] + 0.05 * rng.standard_normal((96, 96, 3)), 0, 1))
    w, report = appearance_weight(maps_of(images), 3, AUTO, seed=0)
    assert report["rule"] == "auto"
    assert w > 0.35, report  # of at most 0.5
    assert report["separability"] > 0.7


def test_rule_gives_a_small_weight_for_colour_noise_unrelated_to_regions():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        # smooth colour noise (a Gaussian field), whatever the regions are
        field = gaussian_filter(rng.standard_normal((96, 96, 3)), (6, 6, 0))
        images.append(np.clip(0.5 + 2.0 * field, 0, 1))
    w, report = appearance_weight(maps_of(images), 3, AUTO, seed=0)
    assert w < 0.1, report


def test_rule_gives_a_small_weight_for_textures_of_one_mean_grey():
    rng = np.random.default_rng(1)
    images = []
    for _ in range(6):
        lab = blob_labels(rng)
        # three textures (fine stripes, checkers, salt and pepper) of the same mean grey
        yy, xx = np.mgrid[:96, :96]
        tex = np.stack([(xx // 2) % 2, (xx // 2 + yy // 2) % 2, rng.random((96, 96)) < 0.5])
        grey = np.take_along_axis(tex, lab[None], 0)[0].astype(np.float32)
        images.append(np.repeat(grey[..., None], 3, -1))
    w, report = appearance_weight(maps_of(images), 3, AUTO, seed=0)
    assert w < 0.1, report


def test_rule_keeps_the_weight_for_evenly_spread_brightness_that_makes_regions():
    """Smooth regions whose grey levels are spread evenly (a solar disk's broad brightness,
    where the dark regions are the class): no groups in the histogram (s about 0.3, no better
    than a uniform cloud), but the bright/dark split makes regions, so the weight stays."""
    rng = np.random.default_rng(2)
    images = []
    for _ in range(6):  # regions a few feature cells (8 px) across
        field = gaussian_filter(rng.standard_normal((96, 96)), 16)
        ranks = field.ravel().argsort().argsort().reshape(field.shape)
        grey = (ranks / ranks.size).astype(np.float32)  # uniform grey levels, smooth regions
        images.append(np.repeat(grey[..., None], 3, -1))
    w, report = appearance_weight(maps_of(images), 2, AUTO, seed=0)
    assert report["coherence"] > 0.7 and report["groups"] == 1.0, report
    assert w == report["separability"] > 0.2, report


def test_rule_gives_no_weight_when_the_brightness_groups_speckle():
    """Two clearly separate grey levels, drawn cell by cell at random (brightness as texture,
    like the dark organelles and one-cell-wide membranes of an electron micrograph): the
    colours split well, but their groups make no regions, so the coherence gate closes."""
    rng = np.random.default_rng(4)
    images = []
    for _ in range(6):
        cells = np.where(rng.random((12, 12)) < 0.5, 0.25, 0.7)
        grey = np.kron(cells, np.ones((8, 8))) + 0.03 * rng.standard_normal((96, 96))
        images.append(np.repeat(np.clip(grey, 0, 1)[..., None], 3, -1).astype(np.float32))
    w, report = appearance_weight(maps_of(images), 2, AUTO, seed=0)
    assert report["separability"] > 0.5, report  # what the histogram alone says
    assert abs(report["coherence"]) < 0.15 and w == 0.0, report


def test_coherence_is_the_neighbour_agreement_of_the_colour_groups_beyond_chance():
    centres = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    halves = torch.zeros(3, 8, 8)
    halves[:, :, 4:] = 1.0  # 112 neighbour pairs; all but the 8 across the border agree
    assert coherence([halves], centres) == pytest.approx((104 / 112 - 0.5) / 0.5)
    checkers = torch.from_numpy(np.indices((8, 8)).sum(0) % 2).float().expand(3, 8, 8)
    assert coherence([checkers], centres) == pytest.approx(-1.0)  # no neighbour agrees
    assert coherence([torch.zeros(3, 8, 8)], centres) == 0.0  # one group: undefined -> 0
    assert coherence([torch.zeros(3, 1, 1)], centres) == 0.0  # no neighbour pair


def test_two_grey_levels_pass_the_coherence_gate():
    """Bright objects on a dark ground (a nuclear stain): grouped grey levels keep their weight."""
    rng = np.random.default_rng(3)
    images = []
    for _ in range(6):
        lab = blob_labels(rng, k=2)
        grey = np.where(lab == 1, 0.6, 0.05) + 0.03 * rng.standard_normal((96, 96))
        images.append(np.repeat(np.clip(grey, 0, 1)[..., None], 3, -1).astype(np.float32))
    w, report = appearance_weight(maps_of(images), 2, AUTO, seed=0)
    assert report["groups"] == 1.0 and w > 0.35, report


def test_a_fixed_weight_is_used_as_given_and_checked():
    maps = [torch.rand(3, 8, 8)]
    assert appearance_weight(maps, 3, AppearanceConfig(weight=0.2))[0] == 0.2
    with pytest.raises(StegoError, match="weight"):
        AppearanceConfig(weight=1.5)


def test_constant_colours_give_no_weight():
    w, _ = appearance_weight([torch.full((3, 10, 10), 0.5)], 3, AUTO)
    assert w == 0.0


def test_teacher_correlation_is_the_blend_of_feature_and_colour_affinities():
    gen = torch.Generator().manual_seed(0)
    dim, n = 16, 400
    feats = torch.randn(1, dim, n, 1, generator=gen)
    colours = torch.rand(1, 3, n, 1, generator=gen)
    x = torch.cat([feats, colours], 1)
    sigma = median_distance([colours[0]])
    teacher = AppearanceTeacher(dim, 0.4, sigma, n_fourier=4096, seed=0)
    t = F.normalize(teacher(x)[0, :, :, 0], dim=0)  # (C, n)
    got = t.T @ t
    f = F.normalize(feats[0, :, :, 0], dim=0)
    a = colours[0, :, :, 0].T
    kernel = torch.exp(-torch.cdist(a, a) ** 2 / (2 * sigma**2))
    want = 0.6 * (f.T @ f) + 0.4 * kernel
    assert (got - want).abs().mean() < 0.03
    assert torch.equal(teacher.features(x), feats)


def colour_classes(n=6, size=160, seed=0):
    """Regions whose class is their colour; each region also carries one of three textures
    drawn independently of its class (so texture alone would mislead)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    textures = [t[:size, :size] / 255.0 for t in (data.brick(), data.grass(), data.gravel())]
    images, labels = [], []
    for _ in range(n):
        lab = blob_labels(rng, size)
        tex_of_region = blob_labels(rng, size)  # another partition, unrelated to the classes
        tex = np.take_along_axis(np.stack(textures), tex_of_region[None], 0)[0]
        img = COLOURS[lab] * (0.75 + 0.5 * (tex[..., None] - 0.5))
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
        labels.append(lab.astype(np.uint8))
    return images, labels


def test_fit_gives_colour_defined_classes_a_large_weight_and_finds_them(offline_backbone,
                                                                         tmp_path):
    from napari_stego import StegoModel
    from napari_stego.features import FeatureConfig
    from napari_stego.metrics import confusion_matrix, hungarian_scores
    from napari_stego.train import TrainConfig

    from napari_stego.appearance import AppearanceConfig

    images, labels = colour_classes()
    model = StegoModel.fit(images, 3, backbone=offline_backbone, seed=0,
                           train=TrainConfig(steps=30, batch_size=8,
                                             appearance=AppearanceConfig(weight=None)),
                           features=FeatureConfig(min_side=224))
    weight = model.info["appearance"]["weight"]
    assert weight > 0.3, model.info["appearance"]
    assert model.train_config.appearance.weight == weight  # the weight used is stored
    conf = sum(confusion_matrix(model.predict(im), gt, 3, 3) for im, gt in zip(images, labels))
    assert hungarian_scores(conf)["miou"] > 75, hungarian_scores(conf)
    loaded = StegoModel.load(model.save(tmp_path / "m.stego"))
    assert loaded.train_config.appearance.weight == weight


def test_fits_from_a_feature_cache_use_appearance_too(offline_backbone, tmp_path):
    from napari_stego import StegoModel
    from napari_stego.features import FeatureConfig
    from napari_stego.train import TrainConfig

    from napari_stego.appearance import AppearanceConfig

    images, _ = colour_classes(n=3)
    auto = TrainConfig(steps=2, batch_size=4, appearance=AppearanceConfig(weight=None))
    kwargs = dict(backbone=offline_backbone, seed=0, train=auto,
                  features=FeatureConfig(min_side=224))
    cached = StegoModel.fit(images, 3, cache=tmp_path, **kwargs)
    in_memory = StegoModel.fit(images, 3, **kwargs)
    assert cached.info["appearance"]["weight"] > 0.3, cached.info["appearance"]
    assert cached.info["appearance"]["weight"] == pytest.approx(
        in_memory.info["appearance"]["weight"], abs=0.02)


def test_the_rule_is_the_default_and_weight_0_turns_appearance_off(offline_backbone):
    """Colour-defined classes: the default fit chooses a large weight by the rule (the gate
    open: the backbone's leading directions group less clearly than the colours);
    ``weight=0`` trains on the features alone."""
    from napari_stego import StegoModel
    from napari_stego.appearance import AppearanceConfig
    from napari_stego.features import FeatureConfig
    from napari_stego.train import TrainConfig

    images, _ = colour_classes(n=2)
    kwargs = dict(backbone=offline_backbone, seed=0, features=FeatureConfig(min_side=224))
    model = StegoModel.fit(images, 3, train=TrainConfig(steps=2, batch_size=4), **kwargs)
    report = model.info["appearance"]
    assert report["rule"] == "auto" and report["gate"] == 1.0, report
    assert model.train_config.appearance.weight == report["weight"] > 0.3
    off = StegoModel.fit(images, 3, train=TrainConfig(
        steps=2, batch_size=4, appearance=AppearanceConfig(weight=0)), **kwargs)
    assert off.train_config.appearance.weight == 0.0
    assert off.info["appearance"]["weight"] == 0.0


def _two_partitions(seed, n=6, size=96):
    """Images whose colour classes are one random partition, and feature maps (stride 8)
    that are grouped by another, independent one."""
    rng = np.random.default_rng(seed)
    images, feats = [], []
    for _ in range(n):
        images.append(np.clip(COLOURS[blob_labels(rng, size)] +
                              0.05 * rng.standard_normal((size, size, 3)), 0, 1))
        other = blob_labels(rng, size)[4::8, 4::8]  # (12, 12) cells
        centres = np.eye(16)[:3] * 3.0
        f = centres[other] + 0.3 * rng.standard_normal((*other.shape, 16))
        feats.append(torch.from_numpy(f.transpose(2, 0, 1)).float())
    return images, feats


def test_gate_closes_when_the_features_group_more_clearly_than_the_colours():
    """Street scenes: colours form groups, but the backbone's own groups are clearer (and
    are what the classes follow); the appearance must then stay out of the target."""
    images, feats = _two_partitions(0)
    w_colour_only, _ = appearance_weight(maps_of(images), 3, AUTO, seed=0)
    assert w_colour_only > 0.35
    w, report = appearance_weight(maps_of(images), 3, AUTO, seed=0, features=feats)
    assert report["feature_separability"] > report["separability"]
    assert report["gate"] == 0.0 and w == 0.0, report


def test_gate_opens_when_the_colours_group_and_the_features_do_not():
    """Stained classes: clear colour groups, features without a dominant grouping."""
    images, _ = _two_partitions(1)
    rng = np.random.default_rng(1)
    feats = [torch.from_numpy(gaussian_filter(rng.standard_normal((16, 12, 12)), (0, 1, 1)))
             .float() for _ in images]
    w, report = appearance_weight(maps_of(images), 3, AUTO, seed=0, features=feats)
    assert report["gate"] == 1.0, report
    assert w == pytest.approx(report["separability"], abs=1e-3) and w > 0.35
