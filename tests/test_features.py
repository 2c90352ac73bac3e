"""Tiled feature extraction, the zarr feature cache and training crops (offline backbone)."""

import threading
from collections import namedtuple

import dask.array as da
import numpy as np
import pytest
import torch
from skimage import data

from napari_stego.cache import FeatureStore, StoreLayout, cache_key
from napari_stego.errors import Cancelled, StegoError
from napari_stego.feature_cache import ensure_features, estimate_cache_bytes
from napari_stego.features import (
    FeatureConfig,
    TensorSink,
    backbone_input,
    extract_features,
    extract_source,
    feature_grid,
)
from napari_stego._device_runner import _Runner
from napari_stego.io import ImageSource, IntensityConfig, open_image
from napari_stego.knn import Unit, crop_window
from napari_stego.tiling import TileConfig
from napari_stego.train_crops import LazyMap, training_maps

SMALL = TileConfig(tile=96, halo=32)  # 3 tiles per 160 x 200 plane
CFG = FeatureConfig(min_side=64)  # no up-sampling of the 160 px planes


@pytest.fixture
def counted(offline_backbone, monkeypatch):
    """The offline backbone, counting its forward calls."""
    calls = []
    forward = offline_backbone.forward

    def counting(x):
        calls.append(tuple(x.shape))
        return forward(x)

    monkeypatch.setattr(offline_backbone, "forward", counting)
    return offline_backbone, calls


@pytest.fixture(scope="module")
def camera():
    return data.camera()[100:420, 60:444].copy()  # 320 x 384 uint8


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(0)
    base = data.camera()[:160, :200].astype(np.uint16) * 16
    return np.stack([base, base[::-1] + rng.integers(0, 50, base.shape).astype(np.uint16)])


def test_single_tile_is_the_whole_image_computation(offline_backbone):
    image = np.random.default_rng(1).integers(0, 4000, (150, 200)).astype(np.uint16)
    cfg = FeatureConfig()
    with torch.inference_mode():
        ref = offline_backbone(offline_backbone.normalize(backbone_input(image, cfg)))[0].half()
    out = extract_features(offline_backbone, image, cfg)
    assert out.shape == ref.shape == (472, 56, 75)  # up-sampled to 448 px, stride 8
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_small_images_give_units_that_hold_a_training_window(offline_backbone):
    """The default min_side (448 px) is the 224-px training window over the crop ratio (0.5):
    every crop that KNN mining compares holds a whole window, so none has to be stretched."""
    from napari_stego.knn import make_units
    from napari_stego.train import TrainConfig

    window = 224 // offline_backbone.stride
    for shape in [(120, 120), (150, 200), (60, 500)]:
        grid = feature_grid(shape, offline_backbone, FeatureConfig())
        units = make_units([grid], TrainConfig().crop_ratio)
        assert min(min(u.h, u.w) for u in units) >= window, (shape, grid)
    grid = feature_grid((120, 120), offline_backbone, FeatureConfig(min_side=224))
    assert min(min(u.h, u.w) for u in make_units([grid])) < window  # 224 px stretched them


def test_tiled_features_match_whole_image(offline_backbone, camera):
    whole = extract_features(offline_backbone, camera, CFG, tiles=TileConfig(tile=4096)).float()
    tiled = extract_features(offline_backbone, camera, CFG,
                             tiles=TileConfig(tile=128, halo=64)).float()
    assert tiled.shape == whole.shape == (472, 40, 48)
    # the stride-8 stage sees less than the halo: identical up to float rounding
    torch.testing.assert_close(tiled[:40], whole[:40], rtol=1e-2, atol=2e-2)
    cos = torch.nn.functional.cosine_similarity(tiled, whole, dim=0)
    assert cos.mean() > 0.97 and cos.min() > 0.7, (cos.mean(), cos.min())
    taper = extract_features(offline_backbone, camera, CFG,
                             tiles=TileConfig(tile=128, halo=64, blend="taper")).float()
    assert torch.isfinite(taper).all() and (taper.abs().sum(0) > 0).all()
    assert torch.nn.functional.cosine_similarity(taper, whole, dim=0).mean() > 0.97
    assert not torch.equal(taper, tiled)


def test_cache_hit_skips_the_backbone(counted, stack, tmp_path):
    net, calls = counted
    src = open_image(stack, axes="ZYX")
    store, _ = ensure_features(net, src, CFG, SMALL, tmp_path, "cpu")
    assert len(calls) == 6 and store.complete and store.on_disk
    assert store.shape == (2, 472, 20, 25)
    first = store.read(1)
    calls.clear()
    again, _ = ensure_features(net, open_image(stack.copy(), axes="ZYX"), CFG, SMALL,
                               tmp_path, "cpu")
    assert calls == [] and again.path == store.path
    np.testing.assert_array_equal(again.read(1), first)
    assert len(list(tmp_path.glob("*.zarr"))) == 1


@pytest.mark.parametrize("change", ["data", "tile", "halo", "blend", "percentiles", "min_side"])
def test_cache_invalidates_when_data_or_settings_change(counted, stack, tmp_path, change):
    net, calls = counted
    ensure_features(net, open_image(stack, axes="ZYX"), CFG, SMALL, tmp_path, "cpu")
    calls.clear()
    data_, cfg, tiles = stack, CFG, SMALL
    if change == "data":
        data_ = stack.copy()
        data_[1, 80, 80] += 1
    elif change == "tile":
        tiles = TileConfig(tile=128, halo=32)
    elif change == "halo":
        tiles = TileConfig(tile=96, halo=64)
    elif change == "blend":
        tiles = TileConfig(tile=96, halo=32, blend="taper")
    elif change == "percentiles":
        cfg = FeatureConfig(min_side=64, intensity=IntensityConfig(percentiles=(1, 99)))
    elif change == "min_side":
        cfg = FeatureConfig(min_side=200)
    ensure_features(net, open_image(data_, axes="ZYX"), cfg, tiles, tmp_path, "cpu")
    assert len(calls) > 0
    assert len(list(tmp_path.glob("*.zarr"))) == 2


def test_interrupted_extraction_resumes(counted, stack, tmp_path):
    net, calls = counted
    cancel = threading.Event()

    def progress(stage, done, total):
        if done >= 3:  # the first plane is complete
            cancel.set()

    src = open_image(stack, axes="ZYX")
    with pytest.raises(Cancelled):
        ensure_features(net, src, CFG, SMALL, tmp_path, "cpu", progress=progress,
                        cancel=cancel)
    assert len(calls) == 3
    calls.clear()
    store, _ = ensure_features(net, src, CFG, SMALL, tmp_path, "cpu")
    assert len(calls) == 3 and store.complete  # only the second plane was computed
    assert np.isfinite(store.read(0)).all() and np.abs(store.read(0).astype(np.float32)).sum() > 0


def test_a_full_disk_is_refused_before_writing(offline_backbone, stack, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("napari_stego.cache.shutil.disk_usage", lambda p: usage(10**9, 0, 10**6))
    src = open_image(stack, axes="ZYX")
    need = estimate_cache_bytes(offline_backbone, src, CFG, SMALL)
    assert need == 2 * 472 * 20 * 25 * 2
    with pytest.raises(StegoError, match=r"needs 944\.0 KB but .* free"):
        ensure_features(offline_backbone, src, CFG, SMALL, tmp_path, "cpu")
    assert not list(tmp_path.glob("*.zarr"))


def test_store_with_other_settings_is_named(tmp_path):
    from napari_stego.cache import StoreLayout

    layout = StoreLayout(1, 4, 5, 6, 4)
    store = FeatureStore.open(tmp_path, {"tile": 512}, layout)
    # a folder carrying the same key but another stamp (e.g. edited by hand)
    store.group.attrs["signature"] = {"tile": 448}
    with pytest.raises(StegoError, match="tile: 448 != 512"):
        FeatureStore.open(tmp_path, {"tile": 512}, layout)
    assert cache_key({"a": (1, 2)}) == cache_key({"a": [1, 2]})


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int16])
def test_dtypes_and_layouts_agree(offline_backbone, dtype):
    rng = np.random.default_rng(2)
    rgb = (rng.random((2, 96, 130, 3)) * 200).astype(dtype)
    cfg = FeatureConfig(min_side=64)
    tiles = TileConfig(tile=64, halo=32)

    def feats(data_, axes):
        src = open_image(data_, axes=axes)
        h, w = feature_grid(src.shape2d, offline_backbone, cfg)
        sink = TensorSink(src.n_planes, 472, h, w)
        extract_source(offline_backbone, src, sink, cfg, tiles, "cpu")
        return np.stack(sink.arrays)

    ref = feats(rgb, "ZYXC")
    assert ref.shape == (2, 472, 12, 17) and np.isfinite(ref).all()
    np.testing.assert_array_equal(feats(np.moveaxis(rgb, -1, 1), "ZCYX"), ref)
    np.testing.assert_array_equal(feats(da.from_array(rgb, chunks=(1, 50, 50, 3)), "ZYXC"), ref)
    if dtype == np.uint8:  # no stretching: a plane maps alike alone and in its stack
        np.testing.assert_array_equal(feats(rgb[1], "YXC")[0], ref[1])
    grey = feats(rgb[..., 0], "ZYX")
    assert grey.shape == ref.shape


def test_nan_constant_and_tiny_images(offline_backbone):
    tiles = TileConfig(tile=64, halo=32)
    nan = np.random.default_rng(3).random((150, 170)).astype(np.float32)
    nan[20:90, 30:100] = np.nan
    for image in (nan, np.full((150, 170), np.nan, np.float32), np.full((150, 170), 3, np.uint16),
                  np.zeros((20, 30), np.uint8), np.ones((1, 1), np.float64)):
        out = extract_features(offline_backbone, image, FeatureConfig(min_side=128), tiles=tiles)
        assert torch.isfinite(out.float()).all() and out.shape[0] == 472


def test_out_of_memory_halves_the_batch(offline_backbone, monkeypatch):
    image = data.camera()[:160, :288]
    tiles1 = TileConfig(tile=64, halo=32, batch_size=1)
    ref = extract_features(offline_backbone, image, CFG, tiles=tiles1)
    forward = offline_backbone.forward

    def small_gpu(x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return forward(x)

    monkeypatch.setattr(offline_backbone, "forward", small_gpu)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = extract_features(offline_backbone, image, CFG,
                               tiles=TileConfig(tile=64, halo=32, batch_size=4))
    torch.testing.assert_close(out, ref)

    def no_gpu(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(offline_backbone, "forward", no_gpu)
    with pytest.raises(StegoError, match="ran out of memory on a single tile"):
        extract_features(offline_backbone, image, CFG, tiles=tiles1)


def test_reader_threads_do_not_change_the_features(offline_backbone):
    """Tiles read by one thread or by several, in batches, land in the same cells."""
    image = data.camera()[:200, :260]
    source = ImageSource(image, "YX")
    h, w = feature_grid(source.shape2d, offline_backbone, CFG)
    tiles = TileConfig(tile=64, halo=32, batch_size=3)
    out = []
    for readers in (1, None):
        sink = TensorSink(1, offline_backbone.dim, h, w)
        extract_source(offline_backbone, source, sink, CFG, tiles, readers=readers)
        out.append(sink.tensors[0])
    torch.testing.assert_close(out[0], out[1])
    assert out[0].float().abs().sum(0).min() > 0  # every cell written


def test_tiles_travel_in_16_bits_only_under_cuda_autocast(offline_backbone):
    """The host -> device copy halves under bf16/fp16 autocast, where the backbone rounds
    its input to 16 bits anyway; float32 everywhere else."""
    def dtype(device, autocast):
        return _Runner(offline_backbone, torch.device(device),
                       FeatureConfig(autocast=autocast), 8).host_dtype

    assert dtype("cuda", "bfloat16") == torch.float16
    assert dtype("cuda", "float16") == torch.float16
    assert dtype("cuda", None) == torch.float32
    assert dtype("cpu", "bfloat16") == torch.float32


def test_training_crops_of_big_maps(tmp_path):
    from napari_stego.cache import StoreLayout

    big = torch.randn(8, 200, 150).half()
    small = torch.randn(8, 28, 30).half()
    maps = training_maps([big, small], window=28)
    assert maps[-1] is small  # small maps stay whole images
    assert len(maps) == 4 * 3 + 1 and all(tuple(m.shape[1:]) == (64, 64) for m in maps[:-1])
    assert maps[0].data_ptr() == big.data_ptr()  # views, no copies
    capped = training_maps([big], window=28, tiles=TileConfig(max_train_crops=2), seed=1)
    assert len(capped) == 2
    many = training_maps([small] * 300, window=28, tiles=TileConfig(max_train_crops=2))
    assert len(many) == 300  # small in-memory images are all used, as before

    store = FeatureStore.open(tmp_path, {"x": 1}, StoreLayout(3, 8, 200, 150, 32))
    values = np.random.default_rng(4).normal(size=(3, 8, 200, 150)).astype(np.float16)
    for p in range(3):
        store.write(p, slice(None), slice(None), values[p])
        store.mark_done(p)
    in_ram = training_maps([store], window=28)
    assert len(in_ram) == 36 and all(isinstance(m, torch.Tensor) for m in in_ram)
    by_bytes = training_maps([store], window=28, tiles=TileConfig(train_ram_mb=1))
    assert len(by_bytes) == 16  # 1 MiB of 8 x 64 x 64 float16 crops
    lazy = training_maps([store], window=28, tiles=TileConfig(train_ram_mb=0, max_train_crops=36))
    assert all(isinstance(m, LazyMap) for m in lazy)
    m = lazy[4]
    np.testing.assert_array_equal(m[:, 3:10, 5:9].numpy(),
                                  values[m.plane, :, m.y + 3:m.y + 10, m.x + 5:m.x + 9])
    crop = crop_window(m, Unit(0, 0, 0, 64, 64), 28, torch.Generator().manual_seed(0))
    assert crop.shape == (8, 28, 28) and crop.dtype == torch.float16


def test_default_tiles_are_sized_for_the_backbone(offline_backbone):
    """A ViT's default core is 64 patches (its attention runs over the read tile's tokens);
    a CNN's is 1024 px. An explicit tile is used as given. CUDA batches hold about the
    pixels of eight 1152 px read tiles."""
    from napari_stego.backbones import create_backbone, upsampled
    from napari_stego.features import batch_size, default_tile, tile_halo

    vit = create_backbone("dino_vits8", pretrained=False)
    assert default_tile(vit) == 512
    assert tile_halo(TileConfig(), vit) == (512, 64)
    assert tile_halo(TileConfig(tile=1024), vit) == (1024, 64)
    assert tile_halo(TileConfig(), offline_backbone) == (1024, 128)
    # an up-sampled ViT reads half as many image pixels: the same tokens per tile
    assert tile_halo(TileConfig(), upsampled(vit, 2)) == (256, 32)
    cuda = torch.device("cuda")
    assert batch_size(TileConfig(), cuda, vit) == 8 * 1152 ** 2 // 640 ** 2 == 25
    assert batch_size(TileConfig(), cuda, offline_backbone) == 8
    assert batch_size(TileConfig(batch_size=3), cuda, vit) == 3
    assert batch_size(TileConfig(), torch.device("cpu"), vit) == 1
    assert TileConfig().tile is None
    with pytest.raises(StegoError, match="tile"):
        TileConfig(tile=0)


@pytest.mark.parametrize("blend", ["crop", "taper"])
def test_parallel_writes_give_the_same_store_as_one_writer(offline_backbone, stack, tmp_path,
                                                           blend):
    """The tiles of a batch written by several threads land in the same cells of a zarr
    feature store, and every plane is marked complete, as with one writer."""
    source = ImageSource(stack, "ZYX")
    tiles = TileConfig(tile=64, halo=32, batch_size=4, blend=blend)
    h, w = feature_grid(source.shape2d, offline_backbone, CFG)
    out = []
    for writers in (1, 3):
        # 16-cell chunks, 8-cell tile cores: neighbouring tiles share chunks
        store = FeatureStore.open(tmp_path / f"w{writers}", {"k": writers},
                                  StoreLayout(2, offline_backbone.dim, h, w, 16))
        extract_source(offline_backbone, source, store, CFG, tiles, writers=writers)
        assert not list(store.missing())
        out.append(np.stack([np.asarray(store.read(p)) for p in range(2)]))
    np.testing.assert_array_equal(out[0], out[1])
    assert np.abs(out[0]).sum(1).min() > 0  # every cell written


def test_concurrent_writes_into_one_chunk_are_not_lost(tmp_path):
    """zarr writes part of a chunk by reading, merging and writing the whole chunk back; two
    threads doing that to one chunk at once lose one write unless the store serialises them."""
    from concurrent.futures import ThreadPoolExecutor

    store = FeatureStore.open(tmp_path, {"k": "race"}, StoreLayout(1, 4, 32, 32, 32))
    rows = [(y, np.full((4, 1, 32), y + 1, np.float16)) for y in range(32)]
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda r: store.write(0, slice(r[0], r[0] + 1), slice(None), r[1]),
                          rows))
        got = store.read(0)[0, :, 0]
        np.testing.assert_array_equal(got, np.arange(1, 33, dtype=np.float16))
        store.write(0, slice(None), slice(None), np.zeros((4, 32, 32), np.float16))
