"""Clustering the codes with the cells' colours (``appearance.ColourSpace``) after a fit
with appearance in its target: the space, the fit, prediction (whole, tiled, from cached
features) and the model file."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_stego import StegoError, StegoModel
from napari_stego.appearance import AppearanceConfig, ColourSpace
from napari_stego.cluster import ClusterConfig
from napari_stego.features import FeatureConfig
from napari_stego.predict import PredictConfig, cluster_probabilities
from napari_stego.tiling import TileConfig
from napari_stego.train import TrainConfig

from test_appearance import colour_classes

FEATURES = FeatureConfig(min_side=224)
TRAIN = TrainConfig(steps=30, batch_size=8, appearance=AppearanceConfig(weight=None))


def test_the_space_blends_code_cosines_and_the_colour_kernel():
    space = ColourSpace(weight=0.4, sigma=0.2, n_fourier=4096, seed=3)
    gen = torch.Generator().manual_seed(0)
    codes, colours = torch.randn(50, 16, generator=gen), torch.rand(50, 3, generator=gen)
    v = space.vectors(codes, colours)
    assert v.shape == (50, 16 + 4096)
    cos = F.normalize(codes, dim=1) @ F.normalize(codes, dim=1).T
    kernel = torch.exp(-torch.cdist(colours, colours) ** 2 / (2 * 0.2**2))
    expected = 0.6 * cos + 0.4 * kernel
    assert (v @ v.T - expected).abs().max() < 0.05  # random Fourier features: approximate
    # a centroid scores a cell by v . theta, split into the code part and the colour part
    theta = F.normalize(torch.randn(4, 16 + 4096, generator=gen), dim=1)
    code_c, colour_c = space.split(theta)
    scores = space.colour_scores(colours.T.reshape(1, 3, 5, 10), colour_c)  # (1, 4, 5, 10)
    unit = F.normalize(codes, dim=1).T.reshape(1, 16, 5, 10)
    total = torch.einsum("bchw,kc->bkhw", unit, space.code_weights(code_c)) + scores
    torch.testing.assert_close(total, (v @ theta.T).T.reshape(1, 4, 5, 10), atol=1e-4,
                               rtol=1e-4)
    probs = cluster_probabilities(codes.T.reshape(1, 16, 5, 10), space.code_weights(code_c),
                                  2.0, colour=scores)
    torch.testing.assert_close(probs, torch.softmax(2.0 * total, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(StegoError):
        ColourSpace(weight=1.0)


@pytest.fixture(scope="module")
def coloured(offline_backbone):
    images, labels = colour_classes()
    model = StegoModel.fit(images, 3, backbone=offline_backbone, seed=0, train=TRAIN,
                           features=FEATURES)
    return model, images, labels


def test_a_fit_with_appearance_clusters_with_colours_and_finds_the_classes(coloured):
    from napari_stego.metrics import confusion_matrix, hungarian_scores

    model, images, labels = coloured
    report = model.info["appearance"]
    assert report["weight"] > 0.3 and model.info["colour_clustering"], model.info
    space = model.colour_space
    assert space.weight == report["weight"] and space.sigma == report["sigma"]
    assert model.centroids.shape == (3, model.head.code_dim)
    assert model.colour_centroids.shape == (3, space.n_fourier)
    merged = model.info["merged_clusters"]  # found with K + 1, two merged by colour
    assert len(merged["pair"]) == 2 and len(model.info["cluster_shares"]) == 3, merged
    conf = sum(confusion_matrix(model.predict(im), gt, 3, 3) for im, gt in zip(images, labels))
    assert hungarian_scores(conf)["miou"] > 75, hungarian_scores(conf)
    assert model.predict(images[0], crf=True).shape == images[0].shape[:2]


def test_the_two_clusters_of_closest_mean_colour_are_merged():
    from napari_stego.fit_cluster import merge_closest_colours

    gen = torch.Generator().manual_seed(0)
    # four clusters of vectors along four axes; clusters 1 and 3 share a colour (dark),
    # 0 and 2 have colours of their own
    axes = torch.eye(4, 8)
    groups = torch.arange(4).repeat_interleave(torch.tensor([30, 10, 20, 40]))
    vectors = F.normalize(axes[groups] + 0.05 * torch.randn(100, 8, generator=gen), dim=1)
    palette = torch.tensor([[0.9, 0.1, 0.1], [0.05, 0.05, 0.05], [0.1, 0.1, 0.9],
                            [0.07, 0.06, 0.05]])
    colours = palette[groups] + 0.01 * torch.randn(100, 3, generator=gen)
    merged, report = merge_closest_colours(vectors, axes.clone(), colours)
    assert report["pair"] == [1, 3] and report["shares"] == [0.1, 0.4], report
    assert merged.shape == (3, 8)
    torch.testing.assert_close(merged[[0, 2]], axes[[0, 2]])  # the others kept, in order
    torch.testing.assert_close(merged[1], F.normalize(10 * axes[1] + 40 * axes[3], dim=0))
    # an empty cluster is the one dropped
    merged, report = merge_closest_colours(vectors[groups != 2], axes.clone(),
                                           colours[groups != 2])
    assert report == {"dropped_empty": 2} and merged.shape == (3, 8)


def test_merge_false_finds_k_clusters_without_merging(offline_backbone):
    images, _ = colour_classes(n=4)
    model = StegoModel.fit(images, 3, backbone=offline_backbone, seed=0, train=TRAIN,
                           features=FEATURES, cluster=ClusterConfig(merge=False))
    assert model.info["colour_clustering"] and "merged_clusters" not in model.info
    assert model.centroids.shape[0] == 3 and model.colour_centroids.shape[0] == 3


def test_the_guards_fallback_clusters_k_not_k_plus_one(offline_backbone, monkeypatch):
    """A collapsed head with colours: the fallback clusters the untrained head's codes alone,
    K of them (the K + 1 of the merge belong to the codes with colours)."""
    from test_guard import collapse_after_training

    collapse_after_training(monkeypatch)
    images, _ = colour_classes(n=4)
    model = StegoModel.fit(images, 3, backbone=offline_backbone, seed=0, train=TRAIN,
                           features=FEATURES)
    assert model.info["guard"]["fallback"], model.info["guard"]
    assert model.centroids.shape[0] == 3 and len(model.info["cluster_shares"]) == 3
    assert model.colour_space is None and "merged_clusters" not in model.info


def test_cached_features_need_the_image_and_give_the_same_probabilities(coloured):
    model, images, _ = coloured
    image = images[0]
    feats = model.features(image)
    with pytest.raises(StegoError, match="colours"):
        model.proba_from_features(feats, image.shape[:2])
    np.testing.assert_allclose(model.proba_from_features(feats, image.shape[:2], image),
                               model.predict_proba(image), atol=1e-6)


def test_the_colour_space_survives_save_and_load(coloured, tmp_path):
    model, images, _ = coloured
    loaded = StegoModel.load(model.save(tmp_path / "m.stego"))
    assert loaded.colour_space == model.colour_space
    np.testing.assert_allclose(loaded.predict_proba(images[1]), model.predict_proba(images[1]),
                               atol=1e-6)


def test_a_file_with_a_colour_space_but_no_colour_centroids_is_refused(coloured, tmp_path):
    from napari_stego.modelfile import read_model_file, write_model_file

    model, _, _ = coloured
    path = model.save(tmp_path / "m.stego")
    meta, tensors = read_model_file(path, 99)
    del tensors["colour_centroids"]
    write_model_file(tmp_path / "bad.stego", tensors, meta)
    with pytest.raises(StegoError, match="colour_centroids"):
        StegoModel.load(tmp_path / "bad.stego")


def test_tiled_prediction_of_a_colour_model_agrees_with_the_whole_image(coloured):
    model, images, _ = coloured
    big = np.concatenate([np.concatenate(images[:2], 1), np.concatenate(images[2:4], 1)], 0)
    kw = dict(feature_config=model.feature_config, info=model.info,
              colour_space=model.colour_space, colour_centroids=model.colour_centroids)
    whole = StegoModel(model.backbone, model.head, model.centroids,
                       tile_config=TileConfig(tile=4096), **kw).predict(big)
    tiled = StegoModel(model.backbone, model.head, model.centroids,
                       tile_config=TileConfig(tile=96, halo=48), **kw).predict(big)
    assert (tiled != whole).mean() < 0.01


def test_colour_false_clusters_the_codes_alone(offline_backbone):
    images, _ = colour_classes(n=3)
    model = StegoModel.fit(images, 3, backbone=offline_backbone, seed=0,
                           train=TrainConfig(steps=2, batch_size=4,
                                             appearance=AppearanceConfig(weight=None)),
                           features=FEATURES, cluster=ClusterConfig(colour=False))
    assert model.info["appearance"]["weight"] > 0.3
    assert model.colour_space is None and not model.info["colour_clustering"]
    feats = model.features(images[0])
    model.predict_config = PredictConfig(guide=None)  # bilinear up-sampling: no image needed
    model.proba_from_features(feats, images[0].shape[:2])
    assert math.isclose(float(model.centroids.norm(dim=1).mean()), 1.0, rel_tol=1e-4)


def test_lazy_prediction_of_a_colour_model_equals_predict(coloured, tmp_path):
    """One plane, one tile: the dask path reads the plane's colours itself (from the image,
    also when the features come from the cache)."""
    model, images, _ = coloured
    image = images[2]
    direct = model.predict(image)
    for cache in (None, tmp_path):
        lazy = model.predict_lazy(image, cache=cache).compute()
        assert (lazy == direct).mean() > 0.999


def test_tiles_take_their_colours_from_the_pixels_read_for_the_backbone(coloured):
    """Without a feature cache a tile's colours come from the pixels the backbone read; they
    must equal the colours read for the same cells on their own (as with cached features),
    also at the bottom and right borders of an image that is not a multiple of the stride."""
    from napari_stego.intensity import fit_intensity
    from napari_stego.io import open_image
    from napari_stego.lazy import TilePredictor
    from napari_stego.tiling import cells

    model, images, _ = coloured
    big = np.concatenate([np.concatenate(images[:2], 1),
                          np.concatenate(images[2:4], 1)], 0)[:310, :301]
    source = open_image(big)
    pred = TilePredictor(model, source, fit_intensity(source, model.feature_config.intensity),
                         TileConfig(tile=96, halo=48))
    s = model.backbone.stride
    assert len(pred.ys) * len(pred.xs) > 4
    for iy in range(len(pred.ys)):
        for ix in range(len(pred.xs)):
            tile = pred.plane_grid.tile(iy, ix)
            (ya, yb), (xa, xb) = cells(tile.y.core, s), cells(tile.x.core, s)
            _, read_with_features = pred._features(0, tile, ya, yb, xa, xb)
            torch.testing.assert_close(read_with_features, pred._colours(0, ya, yb, xa, xb))


def test_guided_tiles_from_the_cache_read_their_colours_once(coloured, tmp_path, monkeypatch):
    """A colour model's guided tiles take the cells' colours from the pixels the guidance
    reads; the separate colour read (``TilePredictor._colours``) is for bilinear ones."""
    from napari_stego.lazy import TilePredictor

    model, images, _ = coloured
    big = np.concatenate([np.concatenate(images[:2], 1), np.concatenate(images[2:4], 1)], 0)
    tiled = StegoModel(model.backbone, model.head, model.centroids,
                       feature_config=model.feature_config, info=model.info,
                       colour_space=model.colour_space, colour_centroids=model.colour_centroids,
                       tile_config=TileConfig(tile=96, halo=48))
    tiled.extract(big, cache=tmp_path)
    calls = []
    real = TilePredictor._colours
    monkeypatch.setattr(TilePredictor, "_colours",
                        lambda self, *a: calls.append(a) or real(self, *a))
    labels = tiled.predict_lazy(big, cache=tmp_path).compute(scheduler="synchronous")
    assert labels.shape == big.shape[:2] and calls == []
    tiled.predict_config = PredictConfig(guide=None)  # the bilinear tiles do read them
    tiled.predict_lazy(big, cache=tmp_path).compute(scheduler="synchronous")
    assert calls
