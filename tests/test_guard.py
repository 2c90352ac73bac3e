"""The usefulness guard: a collapsed head is detected, reported and replaced."""

import pytest
import torch

import napari_stego.model as model_module
from napari_stego import StegoModel
from napari_stego.features import FeatureConfig
from napari_stego.guard import check_codes, simplified_silhouette
from napari_stego.head import SegmentationHead
from napari_stego.metrics import confusion_matrix, hungarian_scores
from napari_stego.train import TrainConfig

FAST = TrainConfig(steps=30, batch_size=8)
SMALL = FeatureConfig(min_side=224)


def collapse(head: SegmentationHead) -> SegmentationHead:
    """Every code the same vector, whatever the features."""
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.linear.bias.fill_(1.0)
    return head


def collapse_after_training(patch: pytest.MonkeyPatch) -> None:
    """Make every fit's trained head collapse (before the guard sees it), through ``patch``."""
    original = model_module.train_head

    def train_then_collapse(*args, **kwargs):
        result = original(*args, **kwargs)
        collapse(result.head)
        return result

    patch.setattr(model_module, "train_head", train_then_collapse)


def two_blobs(n=400, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, dim, generator=gen) * 3
    x = centres[torch.arange(n) % 2] + 0.3 * torch.randn(n, dim, generator=gen)
    return x, centres


def test_silhouette_is_high_for_separate_groups_and_low_for_mixed_ones():
    x, centres = two_blobs()
    assert simplified_silhouette(x, centres) > 0.7
    assert simplified_silhouette(torch.randn(400, 16), torch.randn(2, 16)) < 0.3


def test_check_codes_flags_a_collapsed_head_and_passes_a_working_one():
    x, centres = two_blobs(dim=16)
    maps = [x.T.reshape(16, 20, 20)]
    head = SegmentationHead(16, 8, 0.0).eval()
    with torch.no_grad():  # a head that keeps the features (identity on 8 of 16 channels)
        for p in head.parameters():
            p.zero_()
        head.linear.weight[:, :8, 0, 0] = torch.eye(8)
    good = check_codes(head, maps, centres[:, :8])
    assert not good["fallback"], good
    bad = check_codes(collapse(head), maps, centres[:, :8])
    assert bad["collapsed"] and bad["fallback"], bad
    assert bad["largest_share"] == 1.0 and bad["spread"] < 1e-3


@pytest.fixture(scope="module")
def collapsed_fit(offline_backbone, mosaics):
    images, _ = mosaics
    with pytest.MonkeyPatch.context() as patch:
        collapse_after_training(patch)
        return StegoModel.fit(images, 3, backbone=offline_backbone, train=FAST, seed=0,
                              features=SMALL)


def test_fit_with_a_collapsed_head_warns_and_falls_back(collapsed_fit, mosaics, tmp_path):
    images, labels = mosaics
    info = collapsed_fit.info
    assert info["guard"]["collapsed"] and info["guard"]["fallback"]
    assert len(info["warnings"]) == 1 and "collapsed" in info["warnings"][0]
    # the fallback head still separates the textures (a collapsed one puts all in one class)
    conf = sum(confusion_matrix(collapsed_fit.predict(im), gt, 3, 3)
               for im, gt in zip(images, labels))
    assert hungarian_scores(conf)["accuracy"] > 80
    # the warning travels with the model file
    loaded = StegoModel.load(collapsed_fit.save(tmp_path / "m.stego"))
    assert loaded.info["warnings"] == info["warnings"]


def test_a_normal_fit_keeps_its_head(offline_backbone, mosaics):
    images, _ = mosaics
    model = StegoModel.fit(images[:3], 2, backbone=offline_backbone, train=FAST, seed=0,
                           features=SMALL)
    assert not model.info["guard"]["fallback"], model.info["guard"]
    assert model.info["warnings"] == []


def test_cli_fit_prints_the_guard_warning(offline_backbone, mosaics, tmp_path, capsys,
                                          monkeypatch):
    import tifffile

    from napari_stego.cli import main

    images, _ = mosaics
    tifffile.imwrite(tmp_path / "a.tif", images[0])
    collapse_after_training(monkeypatch)
    assert main(["fit", str(tmp_path / "a.tif"), "--out", str(tmp_path / "m.stego"),
                 "--backbone", "efficientnet_lite0", "--steps", "2", "--quiet"]) == 0
    assert "warning: the head collapsed" in capsys.readouterr().err
