"""Intensity scaling and image splitting."""

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_stego.errors import StegoError
from napari_stego.io import (ImageSource, IntensityConfig, RawTiffArray, data_fingerprint,
                             fit_intensity, to_unit_range,
                             guess_axes, image_list, open_image, to_rgb, to_uint8_rgb)


def test_uint8_is_divided_not_stretched():
    im = np.array([[10, 20], [30, 200]], np.uint8)  # reaches past half the range
    np.testing.assert_allclose(to_rgb(im)[..., 0], im / 255.0, rtol=1e-6)
    rgb = np.random.default_rng(1).integers(20, 230, (16, 16, 3)).astype(np.uint8)
    np.testing.assert_allclose(to_rgb(rgb), rgb / 255.0, rtol=1e-6)


def test_dim_uint8_maps_as_the_same_data_in_16_bit():
    """A dim 8-bit image (fluorescence: nuclei at tens of grey levels over ~0) is stretched
    by its percentiles, exactly as the same values saved as uint16; the rule off, or an
    image reaching half the range, keeps the division by 255."""
    rng = np.random.default_rng(2)
    dim = np.clip(rng.normal(2, 1, (64, 64)), 0, None)
    dim[20:40, 20:40] += rng.normal(40, 8, (20, 20))
    dim = np.clip(dim, 0, 255).astype(np.uint8)
    assert np.percentile(dim, 99.5) < 128
    out = to_rgb(dim)
    np.testing.assert_array_equal(out, to_rgb(dim.astype(np.uint16)))
    assert out.max() == 1.0 and out[30, 30].mean() > 0.5  # the nucleus is bright now
    stats = fit_intensity(open_image(dim))
    assert stats.mode == "joint"
    np.testing.assert_array_equal(stats.apply(dim), out)
    plain = IntensityConfig(dim_uint8=None)
    np.testing.assert_allclose(to_rgb(dim, plain)[..., 0], dim / 255.0, rtol=1e-6)
    assert fit_intensity(open_image(dim), plain).mode == "uint8"
    bright = dim.copy()
    bright[:8, :8] = 200  # 1.6 % of the pixels: the upper percentile passes 128
    np.testing.assert_allclose(to_rgb(bright)[..., 0], bright / 255.0, rtol=1e-6)
    assert fit_intensity(open_image(bright)).mode == "uint8"
    # a stack decides once, on its pooled pixels, and maps every slice alike
    stack = np.stack([dim, dim // 2])
    st = fit_intensity(open_image(stack, axes="ZYX"))
    assert st.mode == "joint" and st.apply(stack[1]).mean() < st.apply(stack[0]).mean()
    with pytest.raises(StegoError, match="dim_uint8"):
        IntensityConfig(dim_uint8=0.0)


def test_model_files_from_before_the_dim_rule_divide_every_uint8():
    import json
    from dataclasses import asdict

    from napari_stego.features import FeatureConfig
    from napari_stego.modelfile import _feature_config

    stored = json.loads(json.dumps(asdict(FeatureConfig())))  # as a model file holds it
    assert _feature_config(stored) == FeatureConfig()
    del stored["intensity"]["dim_uint8"]
    assert _feature_config(stored).intensity.dim_uint8 is None


def test_uint16_uses_robust_percentiles():
    rng = np.random.default_rng(0)
    im = rng.integers(1000, 2000, size=(64, 64)).astype(np.uint16)
    im[0, 0] = 65535  # a hot pixel must not squash the rest
    rgb = to_rgb(im)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.float32
    assert rgb.min() == 0 and rgb.max() == 1
    assert np.median(rgb) == pytest.approx(0.5, abs=0.05)


def test_nan_constant_and_input_untouched():
    im = np.full((8, 8), 7.0)
    im[2, 2] = np.nan
    before = im.copy()
    out = to_rgb(im)
    assert np.isfinite(out).all() and np.all(out == 0)
    np.testing.assert_array_equal(im, before)
    assert np.all(to_rgb(np.full((4, 4), np.nan)) == 0)


def test_grey_rgba_and_uint8_output():
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 1] = 255
    out = to_uint8_rgb(rgba)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and np.all(out[..., 1] == 255)
    grey = to_uint8_rgb(np.arange(20, dtype=np.uint8).reshape(4, 5))
    assert np.all(grey[..., 0] == grey[..., 2])


def test_image_list_shapes():
    assert len(image_list(np.zeros((5, 6)))) == 1
    assert len(image_list(np.zeros((5, 6, 3)))) == 1
    assert len(image_list(np.zeros((4, 5, 6)))) == 4
    assert len(image_list(np.zeros((2, 5, 6, 3)))) == 2
    assert len(image_list([np.zeros((5, 6)), np.zeros((7, 8, 3))])) == 2
    with pytest.raises(StegoError):
        image_list([])
    with pytest.raises(StegoError):
        image_list(np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(StegoError, match="unsupported image dtype"):
        to_rgb(np.array([["a"]]))


# ----------------------------------------------------------------- big data: sources, stats


def test_guess_axes_and_errors():
    assert guess_axes((5, 6)) == "YX"
    assert guess_axes((5, 6, 3)) == "YXC"
    assert guess_axes((7, 5, 6)) == "ZYX"
    assert guess_axes((3, 5, 6), rgb=False) == "ZYX"
    assert guess_axes((7, 5, 6, 4)) == "ZYXC"
    assert guess_axes((7, 5, 6, 2), rgb=True) == "ZYXC"
    with pytest.raises(StegoError, match="axes="):
        guess_axes((2, 7, 5, 6))
    with pytest.raises(StegoError, match="letters"):
        open_image(np.zeros((4, 5)), axes="ZYX")
    with pytest.raises(StegoError, match="not valid"):
        open_image(np.zeros((4, 5)), axes="YY")
    with pytest.raises(StegoError, match="not valid"):
        open_image(np.zeros((4, 5, 2)), axes="YXW")


@pytest.mark.parametrize("layout", ["YX", "YXC", "ZYX", "ZYXC", "CYX", "TZCYX", "XY"])
def test_sources_read_planes_as_yxc(layout):
    rng = np.random.default_rng(0)
    sizes = dict(Y=9, X=11, C=3, Z=4, T=2)
    canon = rng.random((sizes["T"], sizes["Z"], sizes["Y"], sizes["X"], sizes["C"]))
    # the canonical (T, Z, Y, X, C) array seen through `layout`
    keep = [a for a in "TZYXC" if a in layout]
    arr = canon[tuple(slice(None) if a in layout else 0 for a in "TZYXC")]
    arr = np.transpose(arr, [keep.index(a) for a in layout])
    for data in (arr, da.from_array(arr, chunks=3)):
        src = open_image(data, axes=layout)
        lead = [a for a in layout if a in "TZ"]
        assert src.lead_shape == tuple(sizes[a] for a in lead)
        assert src.shape2d == (9, 11) and src.n_channels == (3 if "C" in layout else 1)
        assert src.out_shape == (*src.lead_shape, 9, 11)
        for p in (0, src.n_planes - 1):
            idx = dict(zip(lead, src.plane_index(p)))
            expect = canon[idx.get("T", 0), idx.get("Z", 0)]
            if "C" not in layout:
                expect = expect[..., :1]
            np.testing.assert_array_equal(src.block(p), expect)
            np.testing.assert_array_equal(src.block(p, slice(2, 7), slice(3, 10)),
                                          expect[2:7, 3:10])


def test_tiff_files_open_lazily(tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4000, (3, 40, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", stack, photometric="minisblack",
                     metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "tiled.tif", stack, tile=(16, 16), compression="zlib",
                     photometric="minisblack", metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "multi.ome.tif", np.stack([stack, stack // 2], 1),
                     metadata={"axes": "ZCYX"}, ome=True)
    rgb = rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    plain = open_image(tmp_path / "plain.tif")
    assert isinstance(plain.data, RawTiffArray) and plain.axes == "ZYX"
    tiled = open_image(tmp_path / "tiled.tif")
    assert not isinstance(tiled.data, RawTiffArray) and tiled.axes == "ZYX"
    for src in (plain, tiled):
        np.testing.assert_array_equal(src.block(2, slice(5, 33), slice(7, 50))[..., 0],
                                      stack[2, 5:33, 7:50])
    multi = open_image(tmp_path / "multi.ome.tif")
    assert multi.axes == "ZCYX" and multi.n_channels == 2 and multi.n_planes == 3
    np.testing.assert_array_equal(multi.block(1)[..., 1], stack[1] // 2)
    colour = open_image(tmp_path / "rgb.tif")
    assert colour.axes == "YXC"
    np.testing.assert_array_equal(colour.block(0), rgb)
    assert colour.identity and str(tmp_path) in colour.identity
    with pytest.raises(StegoError, match="does not exist"):
        open_image(tmp_path / "missing.tif")


def test_raw_tiff_array_slices_like_numpy(tmp_path):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 60000, (4, 3, 17, 23), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", arr, photometric="minisblack",
                     metadata={"axes": "ZCYX"})
    src = open_image(tmp_path / "a.tif")
    raw = src.data
    assert isinstance(raw, RawTiffArray) and raw.shape == arr.shape
    for key in [(1,), (slice(None), 2), (2, slice(0, 3), slice(4, 9), slice(1, 22)),
                (3, 1, 16), (slice(1, 3), slice(None), slice(None), 5), (-1, -2)]:
        np.testing.assert_array_equal(raw[key], arr[key])


@pytest.mark.parametrize("image", [
    np.arange(40 * 30, dtype=np.uint8).reshape(40, 30),
    np.random.default_rng(2).integers(0, 60, (40, 30)).astype(np.uint8),  # dim: stretched
    np.random.default_rng(3).integers(1000, 5000, (40, 30)).astype(np.uint16),
    np.random.default_rng(4).normal(size=(40, 30, 3)).astype(np.float32),
    np.random.default_rng(5).integers(0, 255, (40, 30, 4)).astype(np.uint8),
    np.full((40, 30), 7, np.int32),
])
def test_whole_source_stats_map_like_to_rgb(image):
    """Tiles of one image are mapped exactly as the whole image is (same percentiles)."""
    image = image.copy()
    if image.dtype.kind == "f":
        image[3, 4] = np.nan
        image[5, 6] = np.inf
    stats = fit_intensity(open_image(image))
    np.testing.assert_array_equal(stats.apply(image), to_rgb(image))
    np.testing.assert_array_equal(stats.apply(image[10:30, 5:25]), to_rgb(image)[10:30, 5:25])


def test_stack_percentiles_are_stack_wide():
    rng = np.random.default_rng(6)
    dark = rng.integers(100, 200, (20, 20)).astype(np.uint16)
    stack = np.stack([dark, dark * 10])
    src = open_image(stack, axes="ZYX")
    stats = fit_intensity(src)
    a, b = stats.apply(src.block(0)), stats.apply(src.block(1))
    assert a.mean() < 0.1 < 0.5 < b.mean()  # one mapping: the dark slice stays dark
    # per-slice mapping (to_rgb) would stretch both
    assert to_rgb(dark).mean() > 0.3


def test_sampled_stats_are_close_to_exact():
    rng = np.random.default_rng(7)
    stack = rng.gamma(2.0, 300.0, (6, 300, 300)).astype(np.float32)
    src = open_image(stack, axes="ZYX")
    exact = fit_intensity(src)
    sampled = fit_intensity(src, budget=40_000)
    assert sampled.hi[0] == pytest.approx(exact.hi[0], rel=0.1)
    assert sampled.lo[0] == pytest.approx(exact.lo[0], rel=0.2, abs=5)


def test_nan_and_constant_sources():
    nan = np.full((2, 16, 16), np.nan, np.float32)
    out = fit_intensity(open_image(nan, axes="ZYX")).apply(nan[0])
    assert out.shape == (16, 16, 3) and np.all(out == 0)
    const = np.full((2, 16, 16), 9, np.uint16)
    assert np.all(fit_intensity(open_image(const, axes="ZYX")).apply(const[1]) == 0)


def test_channel_choice_for_two_or_many_channels():
    rng = np.random.default_rng(8)
    two = np.stack([rng.random((20, 20)) * 100, rng.random((20, 20))], -1).astype(np.float32)
    with pytest.raises(StegoError, match="channels='pca'"):
        fit_intensity(open_image(two, axes="YXC"))
    with pytest.raises(StegoError, match="channels="):
        to_rgb(two)
    picked = fit_intensity(open_image(two, axes="YXC"), IntensityConfig(channels=(0, 1, 1)))
    rgb = picked.apply(two)
    assert rgb.shape == (20, 20, 3) and rgb.max() == 1 and rgb[..., 0].max() == 1  # per channel
    np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
    np.testing.assert_array_equal(to_rgb(two, IntensityConfig(channels=(0, 1, 1))), rgb)
    five = rng.random((20, 20, 5)).astype(np.float32)
    five[..., 3] = five[..., 0] * 2  # correlated channels
    pca = fit_intensity(open_image(five, axes="YXC"), IntensityConfig(channels="pca"))
    out = pca.apply(five)
    assert out.shape == (20, 20, 3) and out.min() >= 0 and out.max() <= 1
    assert pca.basis.shape == (5, 3)
    with pytest.raises(StegoError, match="only 5"):
        fit_intensity(open_image(five, axes="YXC"), IntensityConfig(channels=(0, 1, 7)))
    with pytest.raises(StegoError, match="three channel indices"):
        IntensityConfig(channels=(0, 1))
    cyx = np.moveaxis(five, -1, 0)
    pca_cyx = fit_intensity(open_image(cyx, axes="CYX"), IntensityConfig(channels="pca"))
    np.testing.assert_allclose(pca_cyx.apply(open_image(cyx, axes="CYX").block(0)), out, atol=1e-6)


def test_data_fingerprint_follows_the_pixels(tmp_path):
    rng = np.random.default_rng(9)
    stack = rng.integers(0, 1000, (3, 64, 64), dtype=np.uint16)
    base = data_fingerprint(open_image(stack, axes="ZYX"))
    assert base == data_fingerprint(open_image(stack.copy(), axes="ZYX"))
    changed = stack.copy()
    changed[2, 40, 41] += 1
    assert data_fingerprint(open_image(changed, axes="ZYX")) != base
    assert data_fingerprint(open_image(stack, axes="ZXY")) != base  # axes are part of it
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack",
                     metadata={"axes": "ZYX"})
    src = open_image(tmp_path / "s.tif")
    sampled = data_fingerprint(src, "sample")
    assert sampled == data_fingerprint(open_image(tmp_path / "s.tif"), "sample")
    tifffile.imwrite(tmp_path / "s.tif", changed, photometric="minisblack",  # new mtime
                     metadata={"axes": "ZYX"})
    assert data_fingerprint(open_image(tmp_path / "s.tif"), "sample") != sampled


def test_big_endian_tiffs_read_their_values(tmp_path):
    """Contiguous TIFFs are read by position: the bytes are in the file's byte order."""
    import tifffile

    image = np.arange(600, dtype=np.uint16).reshape(20, 30) * 37
    for order in "<>":
        tifffile.imwrite(tmp_path / f"{order == '>'}.tif", image, byteorder=order)
        source = open_image(tmp_path / f"{order == '>'}.tif")
        np.testing.assert_array_equal(source.block(0)[..., 0], image)


def test_large_offsets_keep_their_contrast():
    """float32 cannot tell 1e9 from 1e9 + 4: normalisation works in float64."""
    image = np.random.default_rng(0).integers(0, 255, (40, 50))
    expected = to_unit_range(image.astype(np.float64))
    for big in (1e10 + image * 1e-3, 10**12 + image.astype(np.int64) * 100,
                (10**9 + image * 4).astype(np.uint32)):
        np.testing.assert_allclose(to_unit_range(big), expected, atol=2e-3)
        stats = fit_intensity(ImageSource(big, "YX"))
        np.testing.assert_allclose(stats.apply(big)[..., 0], expected, atol=2e-3)


def test_image_list_refuses_empty_images_and_reads_few_channels_as_channels():
    with pytest.raises(StegoError, match="empty"):
        image_list(np.empty((0, 64, 64)))
    with pytest.raises(StegoError, match="empty"):
        image_list(np.zeros((0, 0)))
    assert [im.shape for im in image_list(np.zeros((64, 64, 2)))] == [(64, 64, 2)]
    assert [im.shape for im in image_list(np.zeros((2, 64, 64)))] == [(64, 64)] * 2
    assert guess_axes((64, 64, 2)) == "YXC" and guess_axes((2, 64, 64)) == "ZYX"
