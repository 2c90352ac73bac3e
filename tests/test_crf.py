"""Dense CRF: the reference backend, the torch backend, inputs, tiling and stacks."""

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.cluster.vq import kmeans2
from skimage import data, transform

from napari_stego import crf as crf_mod
from napari_stego.crf import (
    CRFConfig,
    crf_image,
    default_backend,
    dense_crf,
    dense_crf_tiled,
)
from napari_stego.errors import StegoError
from napari_stego.io import IntensityConfig, to_uint8_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def colour_probs(image, k=5, stride=8, temp=20.0, seed=0):
    """Blurry cluster probabilities like STEGO's: soft k-means of colours on a coarse grid,
    bilinearly up-sampled to the image."""
    rgb = crf_image(image).astype(np.float32) / 255
    h, w = rgb.shape[:2]
    small = transform.resize(rgb, (max(h // stride, 2), max(w // stride, 2)), anti_aliasing=True)
    x = small.reshape(-1, 3).astype(np.float32)
    cent, _ = kmeans2(x, k, seed=seed, minit="++")
    logits = -temp * ((x[:, None] - cent[None]) ** 2).sum(-1).T.reshape(k, *small.shape[:2])
    up = torch.nn.functional.interpolate(torch.from_numpy(logits.astype(np.float32))[None],
                                         size=(h, w), mode="bilinear", align_corners=False)
    return torch.softmax(up[0], 0).numpy()


def crop(image, size=128, y=0, x=0):
    return np.ascontiguousarray(image[y:y + size, x:x + size])


def _images():
    images = {
        "astronaut": crop(data.astronaut(), 128, 60, 160),
        "coffee": crop(data.coffee(), 128, 150, 250),
        "ihc": crop(data.immunohistochemistry(), 128, 200, 200),
        "camera": crop(data.camera(), 128, 80, 200),
    }
    em = sorted((SHARED / "isbi2012_em_membrane" / "images").glob("*.png"))
    wbc = sorted((SHARED / "wbc_jiangxi_tecom" / "images").glob("*.png"))
    if em and wbc:
        from skimage.io import imread

        images["em"] = crop(imread(em[0]), 128, 100, 100)
        images["wbc"] = imread(wbc[0])[..., :3]
    return images


IMAGES = _images()


# ---------------------------------------------------------------------------- reference
def test_pydensecrf_backend_is_a_direct_pydensecrf_call():
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    image = IMAGES["astronaut"][:96, :112]
    probs = colour_probs(image)
    c, h, w = probs.shape
    ref = dcrf.DenseCRF2D(w, h, c)
    ref.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    ref.addPairwiseGaussian(sxy=1, compat=3)
    ref.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    expected = np.array(ref.inference(10)).reshape(c, h, w)

    q = dense_crf(image, probs, backend="pydensecrf")
    assert q.dtype == np.float32 and q.shape == (c, h, w)
    np.testing.assert_array_equal(q, expected)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_torch_backend_agrees_with_pydensecrf(name):
    pytest.importorskip("pydensecrf.densecrf")
    image = IMAGES[name]
    probs = colour_probs(image, k=4)
    ref = dense_crf(image, probs, backend="pydensecrf")
    q = dense_crf(image, probs, backend="torch", device="cpu")
    agree = (q.argmax(0) == ref.argmax(0)).mean()
    assert agree >= 0.99, f"{name}: labels agree on {agree:.2%} of pixels"
    assert np.abs(q - ref).mean() < 5e-3
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(pos_w=0), dict(bi_w=0, pos_xy_std=3)],
                         ids=["bilateral", "wide-smoothness"])
def test_lattice_kernels_match_pydensecrf_to_rounding(kw):
    """The bilateral kernel (and a smoothness kernel too wide for the exact separable path)
    go through the same lattice approximation as pydensecrf: equal up to float rounding."""
    pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(5)
    image = IMAGES["coffee"][:48, :56]
    probs = rng.random((3, 48, 56)).astype(np.float32)  # noisy: sensitive to any difference
    probs /= probs.sum(0)
    ref = dense_crf(image, probs, backend="pydensecrf", **kw)
    np.testing.assert_allclose(dense_crf(image, probs, backend="torch", **kw), ref, atol=2e-4)


def test_parameters_are_passed_through():
    pytest.importorskip("pydensecrf.densecrf")
    image = IMAGES["coffee"][:64, :64]
    probs = colour_probs(image, k=3)
    kw = dict(iterations=4, pos_w=2.0, pos_xy_std=2.0, bi_w=6.0, bi_xy_std=20.0, bi_rgb_std=10.0)
    ref = dense_crf(image, probs, backend="pydensecrf", **kw)
    q = dense_crf(image, probs, backend="torch", config=CRFConfig(**kw))
    assert (q.argmax(0) == ref.argmax(0)).mean() >= 0.99
    assert np.abs(q - ref).max() < 0.05
    assert not np.allclose(ref, dense_crf(image, probs, backend="pydensecrf"))


# ------------------------------------------------------------------------ what it does
@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_crf_moves_blocky_labels_onto_a_sharp_edge(backend):
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(0)
    h = w = 96
    edge = 45  # true edge column; the coarse label map puts it at 48
    image = np.where(np.arange(w)[None, :] < edge, 60, 180) + rng.normal(0, 4, (h, w))
    image = np.clip(image, 0, 255).astype(np.uint8)
    truth = np.broadcast_to(np.arange(w)[None, :] >= edge, (h, w))
    blocky = np.broadcast_to(np.arange(w)[None, :] >= 48, (h, w))
    probs = np.stack([np.where(blocky, 0.3, 0.7), np.where(blocky, 0.7, 0.3)]).astype(np.float32)
    before = (probs.argmax(0) == truth).mean()
    q = dense_crf(image, probs, backend=backend)
    after = (q.argmax(0) == truth).mean()
    assert before < 0.97 and after == 1.0


def test_zero_iterations_gives_the_normalised_probabilities():
    image = IMAGES["astronaut"][:32, :32]
    probs = colour_probs(image, k=3)
    q = dense_crf(image, probs, backend="torch", iterations=0)
    expected = np.clip(probs, 1e-5, 1) / np.clip(probs, 1e-5, 1).sum(0)
    np.testing.assert_allclose(q, expected, atol=1e-6)


# ------------------------------------------------------------------------------- inputs
def test_grey_image_is_replicated_to_three_channels():
    grey = IMAGES["camera"][:64, :64]
    probs = colour_probs(grey, k=3)
    q = dense_crf(grey, probs, backend="torch")
    np.testing.assert_array_equal(q, dense_crf(np.repeat(grey[..., None], 3, -1), probs, backend="torch"))


def test_uint16_image_uses_the_feature_percentiles():
    rng = np.random.default_rng(1)
    grey = IMAGES["camera"][:64, :64].astype(np.uint16) * 40 + 3000
    grey[0, 0] = 65535  # a hot pixel must not flatten the colour kernel
    grey = grey + rng.integers(0, 20, grey.shape).astype(np.uint16)
    probs = colour_probs(grey, k=3)
    rgb = crf_image(grey)
    np.testing.assert_array_equal(rgb, to_uint8_rgb(grey))
    assert rgb.max() == 255 and np.percentile(rgb, 90) > 150  # not squashed by the hot pixel
    q = dense_crf(grey, probs, backend="torch")
    np.testing.assert_array_equal(q, dense_crf(rgb, probs, backend="torch"))


def test_dim_uint8_image_is_stretched_as_the_features_are():
    """A dim 8-bit RGB image reaches the colour kernel stretched, as the same data in 16 bit
    (and as the features saw it); a bright one as it is."""
    rgb = IMAGES["astronaut"][:64, :64]
    np.testing.assert_array_equal(crf_image(rgb), rgb)
    dim = (rgb // 6).astype(np.uint8)  # at most 42 of 255
    mapped = crf_image(dim)
    np.testing.assert_array_equal(mapped, crf_image(dim.astype(np.uint16)))
    assert mapped.max() == 255 and mapped.std() > 4 * dim.std()
    probs = colour_probs(dim, k=3)
    np.testing.assert_array_equal(dense_crf(dim, probs, backend="torch"),
                                  dense_crf(mapped, probs, backend="torch"))


def test_rgba_and_multichannel_images():
    rgb = IMAGES["astronaut"][:64, :64]
    probs = colour_probs(rgb, k=3)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    np.testing.assert_array_equal(dense_crf(rgba, probs, backend="torch"),
                                  dense_crf(rgb, probs, backend="torch"))
    # five fluorescence-like channels of different ranges: the features' channel mapping
    if "channels" not in {f.name for f in fields(IntensityConfig)}:
        pytest.skip("this napari_stego.io has no channel mapping yet")
    rng = np.random.default_rng(2)
    chans = np.stack([rgb[..., i % 3].astype(np.float32) * (10.0 ** i) for i in range(5)], -1)
    chans += rng.normal(0, 1, chans.shape).astype(np.float32)
    for channels in [(0, 2, 4), "pca"]:
        cfg = CRFConfig(intensity=IntensityConfig(channels=channels))
        mapped = crf_image(chans, cfg.intensity)
        np.testing.assert_array_equal(mapped, to_uint8_rgb(chans, cfg.intensity))
        assert mapped.shape == (64, 64, 3) and mapped.std() > 20
        np.testing.assert_array_equal(dense_crf(chans, probs, backend="torch", config=cfg),
                                      dense_crf(mapped, probs, backend="torch"))
    with pytest.raises(StegoError, match="channels"):
        dense_crf(chans, probs, backend="torch")


def test_a_fitted_intensity_mapping_is_used_for_every_slice():
    class Halve:  # anything with apply(block) -> (h, w, 3) floats in [0, 1]
        def apply(self, block):
            return np.repeat(block[..., None] / 510.0, 3, -1)

    grey = IMAGES["camera"][:48, :48]
    probs = colour_probs(grey, k=3)
    half = np.repeat((grey // 2)[..., None], 3, -1)  # what Halve gives, as uint8
    q = dense_crf(grey, probs, backend="torch", intensity=Halve())
    # the halved image, dim as it is, taken as it is (not stretched back)
    np.testing.assert_array_equal(q, dense_crf(np.round(grey / 2).astype(np.uint8), probs,
                                               backend="torch",
                                               intensity=IntensityConfig(dim_uint8=None)))
    assert np.abs(crf_image(grey, Halve()).astype(int) - half).max() <= 1


def test_bad_inputs_raise_stego_errors():
    image = IMAGES["astronaut"][:32, :32]
    probs = colour_probs(image, k=3)
    with pytest.raises(StegoError, match="spatial shape"):
        dense_crf(image, probs[:, :16], backend="torch")
    with pytest.raises(StegoError, match=r"\(C, H, W\)"):
        dense_crf(image, probs[0], backend="torch")
    with pytest.raises(StegoError, match="NaN"):
        dense_crf(image, np.full_like(probs, np.nan), backend="torch")
    with pytest.raises(StegoError, match="unknown CRF backend"):
        dense_crf(image, probs, backend="opencv")
    with pytest.raises(StegoError, match="bi_rgb_std"):
        dense_crf(image, probs, backend="torch", bi_rgb_std=0)
    with pytest.raises(StegoError, match="iterations"):
        CRFConfig(iterations=-1)
    with pytest.raises(StegoError, match="CPU only"):
        dense_crf(image, probs, backend="pydensecrf", device="cuda")


def test_missing_pydensecrf_says_how_to_install(monkeypatch):
    monkeypatch.setattr(crf_mod, "has_pydensecrf", lambda: False)
    image = IMAGES["astronaut"][:16, :16]
    with pytest.raises(StegoError, match="pip install pydensecrf2"):
        dense_crf(image, colour_probs(image, k=2), backend="pydensecrf")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend() == "torch"


def test_default_backend(monkeypatch):
    monkeypatch.setattr(crf_mod, "has_pydensecrf", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend() == "pydensecrf"
    assert default_backend("cpu") == "pydensecrf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_backend() == "torch"
    assert default_backend("cpu") == "pydensecrf"
    assert default_backend("cuda") == "torch"


def test_config_and_keywords():
    cfg = CRFConfig(iterations=3)
    assert crf_mod._config(cfg, dict(bi_w=5.0, pos_w=None)) == CRFConfig(iterations=3, bi_w=5.0)
    with pytest.raises(TypeError, match="unknown CRF parameter"):
        crf_mod._config(None, dict(sxy=3))


# --------------------------------------------------------------------------- big images
def _mosaic(size):
    half = size // 2
    ims = [data.astronaut(), data.coffee(), data.immunohistochemistry(), data.chelsea()]
    tiles = [transform.resize(im, (half, half), preserve_range=True).astype(np.uint8) for im in ims]
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)


def test_tiled_crf_matches_the_whole_image():
    image = _mosaic(320)
    probs = colour_probs(image, k=5)
    whole = dense_crf(image, probs, backend="torch").argmax(0)
    tiled = dense_crf_tiled(image, probs, tile=160, halo=64, backend="torch").argmax(0)
    assert (tiled == whole).mean() >= 0.99


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_tiles_with_a_halo_covering_the_image_are_exact(backend):
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
    image = _mosaic(96)
    probs = colour_probs(image, k=3)
    whole = dense_crf(image, probs, backend=backend)
    calls = []
    tiled = dense_crf_tiled(image, probs, tile=50, halo=96, backend=backend, workers=2,
                            progress=lambda *a: calls.append(a))
    np.testing.assert_array_equal(tiled, whole)
    assert calls[-1] == ("crf", 4, 4)


def test_a_window_refined_with_its_origin_matches_that_tile_of_the_tiled_crf():
    """``dense_crf(origin=...)`` on one window of a plane gives exactly what
    ``dense_crf_tiled`` gives for the tile it reads there; batch refines windows that way."""
    image = _mosaic(128)
    probs = colour_probs(image, k=3)
    tiled = dense_crf_tiled(image, probs, tile=64, halo=24, backend="torch")
    window = np.s_[40:128, 40:128]  # what the bottom-right tile reads: its core plus the halo
    q = dense_crf(image[window], probs[(slice(None), *window)], backend="torch", origin=(40, 40))
    np.testing.assert_array_equal(q[:, 24:, 24:], tiled[:, 64:, 64:])
    shifted = dense_crf(image[window], probs[(slice(None), *window)], backend="torch")
    assert not np.array_equal(shifted[:, 24:, 24:], tiled[:, 64:, 64:])  # the lattice moved


# ---------------------------------------------------------------------- the lattice
def test_permutohedral_filter_is_a_local_blur_with_its_transpose():
    from napari_stego._permutohedral import Permutohedral

    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.normal(0, 2, (300, 3)).astype(np.float32))
    lattice = Permutohedral(feats)
    k = lattice.filter(torch.eye(300))  # column j = response to a unit at point j
    # blurring the axes in reverse order gives the transpose operator
    torch.testing.assert_close(lattice.filter(torch.eye(300), reverse=True), k.T)
    assert bool((k >= 0).all()) and bool((k.diagonal() > 0.5).all())
    far = torch.cdist(feats, feats) > 8
    assert float(k[far].max()) == 0.0  # nothing leaks past a few standard deviations
    # a weighted copy folds per-point factors in: after * K(before * v)
    before, after = torch.rand(300), torch.rand(300)
    torch.testing.assert_close(lattice.scaled(before, after).filter(torch.eye(300)),
                               after[:, None] * k * before[None, :], atol=1e-6, rtol=1e-4)


def test_sparse_matrices_are_built_without_torch_warnings(monkeypatch):
    """torch 2.11 warns 'Sparse invariant checks are implicitly disabled ... SEGFAULT' once per
    process (seen on a GPU machine); the CRF's own matrices are valid by construction, so
    neither that nor the 'beta' warning reaches the user."""
    import warnings

    from napari_stego import _permutohedral

    build = torch.sparse_csr_tensor

    def noisy(*args, **kwargs):
        warnings.warn("Sparse invariant checks are implicitly disabled. Memory errors (e.g. "
                      "SEGFAULT) will occur ...", UserWarning, stacklevel=2)
        warnings.warn("Sparse CSR tensor support is in beta state", UserWarning, stacklevel=2)
        return build(*args, **kwargs)

    monkeypatch.setattr(torch, "sparse_csr_tensor", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = _permutohedral._csr(torch.tensor([0, 1, 2]), torch.tensor([0, 1]),
                                torch.tensor([2.0, 3.0]), (2, 2))
    assert torch.equal(m.to_dense(), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))


# ------------------------------------------------------------------ issue 15: inputs, processes
def _flagged(arr, flag):
    """``arr`` as a read-only, non-contiguous, big-endian or memory-mapped array."""
    if flag == "read-only":
        out = arr.copy()
        out.flags.writeable = False
        return out
    if flag == "non-contiguous":
        big = np.zeros((arr.shape[0] * 2,) + arr.shape[1:], arr.dtype)
        big[::2] = arr
        return big[::2]
    if flag == "big-endian":
        return arr.astype(arr.dtype.newbyteorder(">"))
    if flag == "memmap":
        import tempfile

        f = tempfile.NamedTemporaryFile(suffix=".npy", delete=False)
        f.close()
        np.save(f.name, arr)
        return np.load(f.name, mmap_mode="r")
    raise ValueError(flag)


FLAGS = ["read-only", "non-contiguous", "big-endian", "memmap"]


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
@pytest.mark.parametrize("flag", FLAGS)
def test_crf_takes_read_only_strided_big_endian_and_mapped_inputs(backend, flag):
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
    image = _mosaic(64)  # uint8 RGB: handed to the backend as it is
    probs = colour_probs(image, k=3)
    expected = dense_crf(image, probs, backend=backend)
    for img, p in ((_flagged(image, flag), probs), (image, _flagged(probs, flag)),
                   (_flagged(image, flag), _flagged(probs, flag))):
        np.testing.assert_allclose(dense_crf(img, p, backend=backend), expected, atol=1e-6)
        np.testing.assert_allclose(dense_crf_tiled(img, p, tile=40, halo=8, backend=backend),
                                   dense_crf_tiled(image, probs, tile=40, halo=8, backend=backend),
                                   atol=1e-6)


UNGUARDED = """
import sys
import numpy as np
from napari_stego import StegoModel
print("start", flush=True)
model = StegoModel.load(sys.argv[1])
image = np.random.default_rng(0).integers(0, 255, (1100, 48), dtype=np.uint8)
labels = model.predict(image, crf=True)
print("labels", labels.shape, flush=True)
"""


def test_an_unguarded_script_can_predict_with_the_crf_on_a_big_image(tmp_path):
    """No ``if __name__ == "__main__":`` guard, an image of several CRF tiles: the library
    must not start processes that re-import the script (it used to re-run three times and
    die in the workers' bootstrapping)."""
    import os
    import subprocess
    import sys

    import torch

    from napari_stego import StegoModel
    from napari_stego.backbones import create_backbone
    from napari_stego.features import FeatureConfig
    from napari_stego.head import SegmentationHead
    from napari_stego.tiling import TileConfig

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0")
    model = StegoModel(backbone, SegmentationHead(backbone.dim, 8), torch.randn(3, 8),
                       feature_config=FeatureConfig(min_side=32), tile_config=TileConfig(tile=64))
    assert not model._single_tile(np.zeros((1100, 48)))  # several feature and CRF tiles
    path = model.save(tmp_path / "m.stego")
    script = tmp_path / "user_script.py"
    script.write_text(UNGUARDED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("start") == 1, run.stdout  # the script ran once
    assert "labels (1100, 48)" in run.stdout


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_tensor_probabilities_stay_tensors_and_give_the_numpy_result(backend):
    """Probabilities chained from a prediction come as a tensor on the model's device; the
    CRF refines them there and hands back a tensor, the same values as the numpy path."""
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
    image = IMAGES["coffee"][:80, :96]
    probs = colour_probs(image, k=3)
    expected = dense_crf(image, probs, backend=backend)
    q = dense_crf(image, torch.from_numpy(probs.astype(np.float64)), backend=backend)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32 and q.device.type == "cpu"
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-6)
    with pytest.raises(StegoError, match="spatial shape"):
        dense_crf(image, torch.from_numpy(probs[:, :-1]), backend=backend)
    bad = torch.from_numpy(probs.copy())
    bad[0, 0, 0] = float("nan")
    with pytest.raises(StegoError, match="NaN"):
        dense_crf(image, bad, backend=backend)


def test_crf_transfers_to_and_from_the_device_are_exact_on_the_cpu():
    from napari_stego._crf_torch import to_device, to_host

    probs = colour_probs(IMAGES["camera"][:40, :40], k=3)
    t = to_device(probs, torch.device("cpu"))
    assert t.dtype == torch.float32
    np.testing.assert_array_equal(to_host(t), probs)
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(to_device(rgb, "cpu").numpy(), rgb.astype(np.float32))
