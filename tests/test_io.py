"""Intensity scaling and image splitting."""

import numpy as np
import pytest

from napari_stego.errors import StegoError
from napari_stego.io import image_list, to_rgb, to_uint8_rgb


def test_uint8_is_divided_not_stretched():
    im = np.array([[10, 20], [30, 40]], np.uint8)
    np.testing.assert_allclose(to_rgb(im)[..., 0], im / 255.0, rtol=1e-6)


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
