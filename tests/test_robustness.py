"""Property-based tests: whatever array a user passes, the public functions either work or
raise one-line ``StegoError``s, never anything else (issue 15).

Inputs range over dtypes (bool, every integer and float width, huge offsets), shapes (one
pixel, thin strips, odd sizes, stacks, 1-5 channels), memory layouts (read-only,
non-contiguous, big-endian, memory-mapped) and NaN / inf. Examples are few and images tiny so
that the module runs in tens of seconds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_stego import StegoError, StegoModel
from napari_stego.crf import dense_crf, dense_crf_tiled, has_pydensecrf
from napari_stego.features import FeatureConfig
from napari_stego.train import TrainConfig

DTYPES = ["bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
          "float16", "float32", "float64"]
FLAGS = ["plain", "read-only", "non-contiguous", "big-endian", "memmap"]
SHAPES = [(1, 1), (1, 7), (9, 1), (2, 31), (5, 5), (17, 23), (24, 24, 1), (13, 11, 2),
          (16, 20, 3), (15, 9, 4), (12, 14, 5), (3, 16, 16), (2, 12, 10, 3)]
_COUNTER = itertools.count()
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _values(rng, dtype: np.dtype, shape, offset: bool, specials: bool) -> np.ndarray:
    if dtype == bool:
        return rng.random(shape) > 0.5
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
        if offset:  # a small signal on top of a big constant
            base = hi - 1000 if dtype.itemsize >= 4 else (lo + hi) // 2
            return (np.array(base, dtype) + rng.integers(0, 255, shape).astype(dtype)).astype(dtype)
        return rng.integers(max(lo, -1000), min(hi, 1000), shape, endpoint=True).astype(dtype)
    arr = rng.normal(0, 1, shape)
    if offset:
        arr = arr * (1e-3 if dtype.itemsize == 8 else 1.0) + \
            {2: 6e4, 4: 1e30, 8: 1e10}[dtype.itemsize]
    arr = arr.astype(dtype)
    if specials and arr.size:
        flat = arr.reshape(-1)
        picks = rng.integers(0, flat.size, max(1, flat.size // 5))
        flat[picks] = rng.choice([np.nan, np.inf, -np.inf], picks.size)
        if rng.random() < 0.2:
            flat[:] = np.nan
    return arr


def _flag(arr: np.ndarray, flag: str, tmp_path) -> np.ndarray:
    if flag == "read-only":
        arr = arr.copy()
        arr.flags.writeable = False
    elif flag == "non-contiguous":
        big = np.zeros((arr.shape[0] * 2,) + arr.shape[1:], arr.dtype)
        big[::2] = arr
        arr = big[::2]
    elif flag == "big-endian":
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    elif flag == "memmap":
        path = tmp_path / f"a{np.random.default_rng().integers(1 << 30)}.npy"
        np.save(path, arr)
        arr = np.load(path, mmap_mode="r")
    return arr


@st.composite
def images(draw, shapes=SHAPES):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    offset = draw(st.booleans())
    specials = dtype.kind == "f" and draw(st.booleans())
    return _values(rng, dtype, shape, offset, specials), draw(st.sampled_from(FLAGS))


def _one_line_error(exc: StegoError) -> None:
    text = str(exc)
    assert text and "\n" not in text, repr(text)


@pytest.fixture(scope="module")
def tiny_model(offline_backbone):
    """A model fitted in a second: two 24-px images, 64-px backbone input, 2 steps."""
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (24, 24), dtype=np.uint8) for _ in range(2)]
    return StegoModel.fit(imgs, 3, backbone=offline_backbone, features=FeatureConfig(min_side=64),
                          train=TrainConfig(steps=2, batch_size=2, code_dim=8), seed=0)


@SETTINGS
@given(case=images())
def test_predict_and_predict_proba_work_or_say_why(tiny_model, tmp_path, case):
    image, flag = case
    image = _flag(image, flag, tmp_path)
    try:
        labels = tiny_model.predict(image)
    except StegoError as exc:
        _one_line_error(exc)
        return
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
    assert labels.max() < tiny_model.n_clusters
    probs = tiny_model.predict_proba(image)
    assert probs.shape == (tiny_model.n_clusters, *image.shape[:2])
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(0), labels)


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_dense_crf_works_or_says_why(backend, tmp_path):
    if backend == "pydensecrf" and not has_pydensecrf():
        pytest.skip("pydensecrf is not installed")

    @SETTINGS
    @given(case=images(shapes=[s for s in SHAPES if len(s) == 2 or s[-1] <= 5 and s[0] > 8]),
           k=st.integers(1, 4), pdtype=st.sampled_from(["float16", "float32", "float64", "int64"]),
           pflag=st.sampled_from(FLAGS), tiled=st.booleans(), seed=st.integers(0, 2**16))
    def check(case, k, pdtype, pflag, tiled, seed):
        image, flag = case
        image = _flag(image, flag, tmp_path)
        rng = np.random.default_rng(seed)
        p = rng.random((k, *image.shape[:2])) + 1e-3
        probs = _flag((p / p.sum(0)).astype(pdtype), pflag, tmp_path)
        try:
            q = dense_crf_tiled(image, probs, tile=8, halo=4, backend=backend) if tiled else \
                dense_crf(image, probs, backend=backend)
        except StegoError as exc:
            _one_line_error(exc)
            return
        assert q.shape == (k, *image.shape[:2]) and q.dtype == np.float32
        np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)

    check()


@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=images(shapes=[(1, 9), (3, 20, 20), (10, 16), (2, 12, 12, 3), (14, 12, 2)]),
       code_dim=st.integers(-1, 4), n_clusters=st.integers(1, 3))
def test_fit_works_or_says_why(offline_backbone, tmp_path, case, code_dim, n_clusters):
    image, flag = case
    image = _flag(image, flag, tmp_path)
    try:
        model = StegoModel.fit(image, n_clusters, backbone=offline_backbone, code_dim=code_dim,
                               features=FeatureConfig(min_side=32),
                               train=TrainConfig(steps=1, batch_size=2), seed=0)
    except StegoError as exc:
        _one_line_error(exc)
        return
    assert code_dim >= 1
    assert model.centroids.shape == (n_clusters, code_dim)
    assert torch.isfinite(model.centroids).all()


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=images(shapes=[(1, 1), (2, 9), (7, 5), (3, 8, 6), (9, 7, 3), (6, 5, 2)]),
       big_endian=st.booleans())
def test_tiff_readers_work_or_say_why(tmp_path, case, big_endian):
    """The napari reader and :func:`~napari_stego.io.open_image` on TIFFs of every dtype and
    byte order: the pixels come back as written, or a StegoError says why."""
    import tifffile

    from napari_stego._reader import napari_get_reader
    from napari_stego.io import open_image

    image, _ = case
    path = tmp_path / f"x{next(_COUNTER)}.tif"
    rgb = image.ndim == 3 and image.shape[-1] == 3 and image.dtype != bool
    try:
        tifffile.imwrite(path, image, byteorder=">" if big_endian else "<",
                         photometric="rgb" if rgb else "minisblack")
    except (ValueError, TypeError):  # a dtype TIFF cannot hold (e.g. float16 with some writers)
        return
    reader = napari_get_reader(str(path))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image"
    np.testing.assert_array_equal(np.asarray(data), image)
    try:
        source = open_image(path)
    except StegoError as exc:
        _one_line_error(exc)
        return
    planes = [source.block(p) for p in range(source.n_planes)]
    assert all(p.shape == (*source.shape2d, source.n_channels) for p in planes)
    # every pixel read once, whatever the axes turned out to be
    np.testing.assert_array_equal(np.sort(np.concatenate([p.reshape(-1) for p in planes])),
                                  np.sort(image.reshape(-1)))
