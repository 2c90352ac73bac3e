"""Lazy (dask) segmentation of big images and stacks, and fitting from the feature cache."""

import threading

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr
from skimage import data

from napari_stego import Cancelled, StegoModel
from napari_stego.appearance import work_rgb
from napari_stego.cluster import spherical_kmeans
from napari_stego.features import FeatureConfig, extract_features
from napari_stego.head import SegmentationHead
from napari_stego.intensity import to_rgb
from napari_stego.predict import (
    PredictConfig,
    cluster_probabilities,
    guided_probabilities,
    upsample_code,
)
from napari_stego.tiling import TileConfig
from napari_stego.train import TrainConfig

TILES = TileConfig(tile=128, halo=64)
CFG = FeatureConfig(min_side=64)


@pytest.fixture(scope="module")
def model(offline_backbone):
    """A head projecting onto the 16 main principal components of the features, with
    centroids from k-means of its codes: meaningful clusters without training."""
    head = SegmentationHead(472, 16).eval()
    with torch.inference_mode():
        feats = extract_features(offline_backbone, data.camera()[::2, ::2], CFG).float()
        x = feats.flatten(1).T
        mean = x.mean(0)
        v = torch.linalg.svd(x - mean, full_matrices=False).Vh[:16].T  # (472, 16)
        head.linear.weight.copy_(v.T[:, :, None, None])
        head.linear.bias.copy_(-(mean @ v))
        head.nonlinear[2].weight.zero_()
        head.nonlinear[2].bias.zero_()
        codes = head(feats[None])[0].flatten(1).T
    centroids = spherical_kmeans(codes, 3, seed=0)
    return StegoModel(offline_backbone, head, centroids, feature_config=CFG, tile_config=TILES)


@pytest.fixture(scope="module")
def camera():
    return data.camera()[100:420, 60:444].copy()  # 320 x 384 uint8: 3 x 3 tiles


def _with_tiles(model, tiles):
    return StegoModel(model.backbone, model.head, model.centroids, feature_config=CFG,
                      tile_config=tiles)


@pytest.mark.parametrize("guide", [0.05, None])
def test_cached_lazy_prediction_equals_the_assembled_map(model, camera, tmp_path, guide):
    """Tile by tile from the cache equals the whole map: guided up-sampling (the default)
    and the bilinear up-sampling of model files from before it."""
    model = StegoModel(model.backbone, model.head, model.centroids, feature_config=CFG,
                       tile_config=TILES, predict_config=PredictConfig(guide=guide))
    labels, probs = model.predict_lazy(camera, cache=tmp_path, proba=True)
    assert labels.shape == camera.shape and labels.dtype == np.uint8
    assert probs.shape == (3, *camera.shape) and labels.chunks == ((128, 128, 64), (128, 128, 128))
    store = model.extract(camera, cache=tmp_path)  # found, not recomputed
    with torch.inference_mode():
        feats = torch.from_numpy(store.read(0)).float()[None]
        if guide is None:
            code = upsample_code(model.head(feats), 8, camera.shape, camera.shape)
            ref = cluster_probabilities(code, model.centroids, 2.0)[0].numpy()
        else:
            rgb = work_rgb(to_rgb(camera, CFG.intensity), camera.shape)
            ref = guided_probabilities(model.head(feats), rgb, camera.shape, 8,
                                       model.predict_config, model.score_parts)[0].numpy()
    p = probs.compute()
    np.testing.assert_allclose(p, ref, atol=1e-5)
    agree = (labels.compute() == ref.argmax(0)).mean()
    assert agree > 0.9999, agree


def test_tiled_labels_agree_with_whole_image_labels(model):
    """Seams: tiles of 128 px with a 128 px halo (16 tiles, 24 seams) against one pass."""
    image = data.camera()  # 512 x 512
    whole = _with_tiles(model, TileConfig(tile=4096)).predict(image)
    for blend in ("crop", "taper"):
        tiled = _with_tiles(model, TileConfig(tile=128, halo=128, blend=blend)).predict(image)
        disagree = (tiled != whole).mean()
        assert disagree < 0.005, (blend, disagree)


def test_images_of_one_tile_are_predicted_as_before(model):
    image = data.coins()[:150, :170]  # fits one tile read (<= 128 + 2 * 64)
    lazy_labels, lazy_probs = model.predict_lazy(image, proba=True)
    np.testing.assert_array_equal(lazy_labels.compute(), model.predict(image))
    np.testing.assert_allclose(lazy_probs.compute(), model.predict_proba(image), atol=1e-6)


def test_a_whole_plane_is_read_once_for_the_backbone_and_the_guidance(model, monkeypatch):
    import napari_stego.lazy as lazy

    reads = []
    real = lazy._load_job

    def counted(*args, **kwargs):
        reads.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(lazy, "_load_job", counted)
    image = data.coins()[:40, :50]  # up-sampled for the backbone: a whole plane
    labels = model.predict_lazy(image).compute(scheduler="synchronous")
    assert labels.shape == image.shape and len(reads) == 1, reads


def test_guided_tiles_without_a_cache_read_their_pixels_once(model, monkeypatch):
    """Without a feature cache a guided tile takes the guidance's pixels from its read for
    the backbone: no second read (``TilePredictor._pixels``), and the borders still land
    where one pass over the whole image puts them (a guidance misplaced by a cell would
    move them)."""
    from napari_stego.lazy import TilePredictor

    image = data.camera()  # 512 x 512: 16 tiles of 128 px
    whole = _with_tiles(model, TileConfig(tile=4096)).predict(image)
    calls = []
    real = TilePredictor._pixels
    monkeypatch.setattr(TilePredictor, "_pixels",
                        lambda self, *a: calls.append(a) or real(self, *a))
    tiled = _with_tiles(model, TileConfig(tile=128, halo=128)).predict(image)
    assert calls == []
    assert (tiled != whole).mean() < 0.005


def test_big_in_memory_images_predict_tile_by_tile(model, camera):
    labels = model.predict(camera)
    np.testing.assert_array_equal(labels, model.predict_lazy(camera).compute())
    probs = model.predict_proba(camera)
    assert probs.shape == (3, *camera.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), labels)


@pytest.mark.parametrize("layout,shape,out", [
    ("ZYX", (3, 90, 140), (3, 90, 140)),
    ("YXC", (90, 140, 3), (90, 140)),
    ("CYX", (3, 90, 140), (90, 140)),
    ("TZYX", (2, 2, 90, 140), (2, 2, 90, 140)),
    ("ZYXC", (2, 90, 140, 3), (2, 90, 140)),
])
def test_layouts_give_labels_of_the_spatial_shape(model, layout, shape, out):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 3000, shape).astype(np.uint16)
    for data_ in (arr, da.from_array(arr, chunks=40)):
        labels, probs = model.predict_lazy(data_, axes=layout, proba=True)
        assert labels.shape == out and labels.dtype == np.uint8
        assert probs.shape == (*out[:-2], 3, *out[-2:])
    np.testing.assert_array_equal(labels.compute(),
                                  model.predict_lazy(arr, axes=layout).compute())
    np.testing.assert_allclose(probs.sum(axis=-3).compute(), 1, rtol=1e-5)


def test_progress_and_cancel(model, camera):
    seen = []
    model.predict_lazy(camera, progress=lambda *a: seen.append(a)).compute()
    assert seen[-1][0] == "segment" and sorted(s[1] for s in seen) == list(range(1, 10))
    assert {s[2] for s in seen} == {9}
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        model.predict_lazy(camera, cancel=cancel).compute()


def test_tiff_stack_to_zarr_on_disk(model, tmp_path):
    rng = np.random.default_rng(1)
    stack = (data.camera()[:200, :260].astype(np.uint16)[None] * 10
             + rng.integers(0, 100, (3, 200, 260)).astype(np.uint16))
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack",
                     metadata={"axes": "ZYX"})
    labels = model.predict_lazy(tmp_path / "stack.tif")
    labels.to_zarr(str(tmp_path / "labels.zarr"))
    back = zarr.open(str(tmp_path / "labels.zarr"), mode="r")
    np.testing.assert_array_equal(back[:], model.predict_lazy(stack, axes="ZYX").compute())


def test_nan_and_constant_images(model):
    nan = np.random.default_rng(2).random((200, 300)).astype(np.float32)
    nan[50:150, 100:250] = np.nan
    for image in (nan, np.full((200, 300), 4, np.uint16), np.full((200, 300), np.nan)):
        labels = model.predict_lazy(image).compute()
        assert labels.shape == (200, 300) and labels.max() < 3


def test_save_load_keeps_the_tile_settings(model, camera, tmp_path):
    path = model.save(tmp_path / "m.stego")
    loaded = StegoModel.load(path)
    assert loaded.tile_config == TILES and loaded.feature_config == CFG
    assert loaded.metadata()["tile_config"]["tile"] == 128
    np.testing.assert_array_equal(loaded.predict_lazy(camera).compute(),
                                  model.predict_lazy(camera).compute())


def test_refit_from_the_cache_never_runs_the_backbone(offline_backbone, tmp_path, monkeypatch):
    calls = []
    forward = offline_backbone.forward
    monkeypatch.setattr(offline_backbone, "forward", lambda x: calls.append(1) or forward(x))
    rng = np.random.default_rng(3)
    stack = np.stack([data.camera()[:256, :320], data.camera()[256:, 192:]]).astype(np.float32)
    stack += rng.normal(0, 3, stack.shape).astype(np.float32)
    lazy = da.from_array(stack, chunks=(1, 128, 128))
    tiles = TileConfig(tile=128, halo=32, train_crop=12)
    fast = TrainConfig(steps=2, batch_size=4)
    stages = []
    m1 = StegoModel.fit(lazy, 3, backbone=offline_backbone, train=fast, tiles=tiles,
                        features=CFG, cache=tmp_path, seed=0,
                        progress=lambda s, i, n: stages.append(s))
    assert calls and {"features", "train", "cluster"} <= set(stages)
    assert m1.info["n_images"] == 2 and m1.info["n_train_maps"] > 2  # crops of the planes
    calls.clear()
    m2 = StegoModel.fit(lazy, 5, backbone=offline_backbone, train=fast, tiles=tiles,
                        features=CFG, cache=tmp_path, seed=0)
    assert calls == [] and m2.n_clusters == 5
    labels = m2.predict_lazy(lazy, cache=tmp_path).compute()
    assert calls == [] and labels.shape == (2, 256, 320) and labels.max() < 5


def test_band_upsampling_equals_whole_map_upsampling():
    from napari_stego.lazy import _upsample_band

    code = torch.randn(1, 5, 40, 30)
    full = upsample_code(code, 8, (317, 233), (317, 233))  # (1, 5, 317, 233)
    ya, xa = 11, 6  # a region of the map with one cell of margin around pixels 96..256
    region = code[:, :, ya:33, xa:27]
    for rows in [(96, 100), (96, 256), (200, 256), (97, 161)]:
        band = _upsample_band(region, ya, xa, 8, rows, (56, 208))
        torch.testing.assert_close(band, full[..., rows[0]:rows[1], 56:208])
    # at the image border the whole map clamps, and so does the band
    band = _upsample_band(code, 0, 0, 8, (0, 64), (0, 233))
    torch.testing.assert_close(band, full[..., :64, :])
    band = _upsample_band(code, 0, 0, 8, (300, 317), (0, 233))
    torch.testing.assert_close(band, full[..., 300:317, :])
