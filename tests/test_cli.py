"""The napari-stego command: demo, weights, fit, segment and evaluate sub-commands."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stego.cli import main


def test_demo_writes_labels_model_and_overlay(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    labels = tifffile.imread(out / "ihc_labels.tif")
    assert labels.shape == (512, 512) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert (out / "ihc_overlay.png").stat().st_size > 0
    assert (out / "ihc.stego").exists()
    assert str(out / "ihc_labels.tif") in printed


def test_weights_list_and_path(capsys):
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "dino_vits8" in listing and "efficientnet_lite0" in listing
    assert main(["weights", "path", "efficientnet_lite0"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()


def test_user_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["weights", "path", "no_such_backbone"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-stego: error: unknown backbone") and "\n" not in err


# ------------------------------------------------------------------ fit / segment / evaluate
def _texture_files(root: Path) -> tuple[Path, Path]:
    from napari_stego.samples import texture_mosaics

    images, classes = texture_mosaics(n=5, size=64)
    data, gt = root / "data", root / "gt"
    data.mkdir()
    gt.mkdir()
    for i in range(2):
        tifffile.imwrite(data / f"tex{i}.tif", images[i])
        tifffile.imwrite(gt / f"tex{i}.tif", classes[i])
    tifffile.imwrite(data / "stack.tif", images[2:], photometric="minisblack")
    tifffile.imwrite(gt / "stack.tif", classes[2:], photometric="minisblack")
    return data, gt


def test_fit_segment_evaluate_round_trip(tmp_path, capsys):
    import json

    data, gt = _texture_files(tmp_path)
    model, out = tmp_path / "tex.stego", tmp_path / "labels"
    assert main(["fit", str(data / "tex*.tif"), "--out", str(model), "--backbone",
                 "efficientnet_lite0", "--steps", "2", "--n-clusters", "3", "--device", "cpu",
                 "--quiet"]) == 0
    assert model.is_file()

    assert main(["segment", str(model), str(data / "*.tif"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 written" in printed and str(out) in printed
    assert tifffile.imread(out / "tex0.tif").shape == (64, 64)
    stack = tifffile.imread(out / "stack.tif")
    assert stack.shape == (3, 64, 64) and stack.dtype == np.uint8 and stack.max() < 3

    assert main(["segment", str(model), str(data), "--out", str(out)]) == 0  # resumed
    assert "3 already done" in capsys.readouterr().out

    assert main(["evaluate", str(out), str(gt)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "over 3 files" in printed
    scores = json.loads((out / "evaluation.json").read_text())
    assert 0 <= scores["miou"] <= 100 and 0 <= scores["accuracy"] <= 100
    assert np.asarray(scores["confusion"]).shape == (3, 3)
    assert np.asarray(scores["confusion"]).sum() == 5 * 64 * 64
    assert len(scores["iou_per_class"]) == 3 and len(scores["files"]) == 3
    from skimage.io import imread

    assert imread(out / "confusion.png").shape[-1] == 3


def test_segment_exit_codes(tmp_path, capsys):
    data, _ = _texture_files(tmp_path)
    assert main(["segment", str(tmp_path / "none.stego"), str(data), "--out",
                 str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"napari-stego: error: model file {tmp_path / 'none.stego'} does not exist")
    with pytest.raises(SystemExit) as exc:
        main(["segment", "m.stego", str(data), "--out", "o", "--format", "png"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--help"])
    assert exc.value.code == 0 and "--scheduler" in capsys.readouterr().out


def test_evaluate_without_matching_names_is_a_user_error(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    tifffile.imwrite(tmp_path / "p" / "a.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "g" / "b.tif", np.zeros((4, 4), np.uint8))
    assert main(["evaluate", str(tmp_path / "p"), str(tmp_path / "g")]) == 2
    assert "no prediction in" in capsys.readouterr().err


def test_cli_backbone_choices_follow_the_registry():
    from napari_stego.backbones import list_backbones
    from napari_stego.cli import _backbone_names

    assert _backbone_names() == list_backbones()


def test_fit_without_usable_images_is_a_user_error(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "flat.tif", np.full((32, 32), 3, np.uint16))
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    assert main(["fit", str(tmp_path), "--out", str(tmp_path / "m.stego"), "--backbone",
                 "efficientnet_lite0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-stego: error: no usable images to fit on")
    assert "flat.tif" in err and "constant image" in err and "broken.tif" in err
    assert not (tmp_path / "m.stego").exists()


def test_fit_upsample_is_stored_and_bad_factors_are_user_errors(tmp_path, capsys):
    from napari_stego import StegoModel

    data, _ = _texture_files(tmp_path)
    model = tmp_path / "up.stego"
    base = ["fit", str(data / "tex0.tif"), "--out", str(model), "--backbone",
            "efficientnet_lite0", "--steps", "1", "--n-clusters", "2", "--device", "cpu", "--quiet"]
    assert main(base + ["--upsample", "2"]) == 0
    loaded = StegoModel.load(model)
    assert loaded.feature_config.upsample == 2 and loaded.backbone.stride == 4
    assert main(base + ["--upsample", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot up-sample" in err and "\n" not in err
