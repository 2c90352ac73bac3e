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
    from napari_stego import DEFAULT_N_CLUSTERS
    from napari_stego._reader import read_tiff

    labels = tifffile.imread(out / "ihc_labels.tif")
    assert labels.shape == (512, 512) and labels.dtype == np.uint8
    assert labels.min() >= 1 and labels.max() <= DEFAULT_N_CLUSTERS  # ids 1..K, 0 = no data
    # the demo's labels reopen as a Labels layer with proper metadata (was repr(model))
    [(_, kwargs, kind)] = read_tiff(out / "ihc_labels.tif")
    meta = kwargs["metadata"]["napari_stego"]
    assert kind == "labels" and kwargs["name"] == "ihc clusters"
    assert meta["label_offset"] == 1 and meta["n_clusters"] == DEFAULT_N_CLUSTERS
    assert meta["axes"] == "YX" and meta["written_by"] == "napari-stego demo"
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
    assert stack.shape == (3, 64, 64) and stack.dtype == np.uint8
    assert stack.min() >= 1 and stack.max() <= 3  # cluster ids 1..K

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


# ------------------------------------------------------------------ user mistakes, early
def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-stego: error:") and "\n" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_fit_checks_where_it_saves_before_fitting(tmp_path, capsys, monkeypatch):
    from napari_stego import StegoModel

    data, _ = _texture_files(tmp_path)

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before the output was checked")

    monkeypatch.setattr(StegoModel, "fit", no_fit)
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    for out, words in ((folder, "is a folder"), (tmp_path / "notes.txt" / "m.stego", "cannot write")):
        assert main(["fit", str(data), "--out", str(out), "--quiet"]) == 2
        _one_line_error(capsys, str(out), words)
    assert sorted(p.name for p in tmp_path.rglob("*partial*")) == []


def test_a_failed_model_save_is_one_line_and_leaves_no_partial(tmp_path, capsys, monkeypatch):
    from napari_stego import StegoModel

    data, _ = _texture_files(tmp_path)
    out = tmp_path / "m.stego"

    def save(self, path):  # as a read-only folder or a full disk does, half-way
        Path(str(path) + ".partial").write_bytes(b"half a model")
        raise RuntimeError("Error while serializing: IoError(Os { code: 30, kind: "
                           "ReadOnlyFilesystem, message: \"Read-only file system\" })")

    monkeypatch.setattr(StegoModel, "save", save)
    assert main(["fit", str(data / "tex0.tif"), "--out", str(out), "--backbone",
                 "efficientnet_lite0", "--steps", "1", "--n-clusters", "2", "--device", "cpu",
                 "--quiet"]) == 2
    _one_line_error(capsys, "cannot write the model", "Read-only file system")
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("args", [["fit", "x.tif", "--out", "m.stego", "--steps", "-4"],
                                  ["fit", "x.tif", "--out", "m.stego", "--n-clusters", "0"],
                                  ["segment", "m.stego", "x.tif", "--out", "o", "--workers", "0"],
                                  ["evaluate", "p", "g", "--n-classes", "0"],
                                  ["demo", "--steps", "-1"]])
def test_nonsensical_numbers_are_user_errors(capsys, args):
    assert main(args) == 2
    _one_line_error(capsys, "must be a positive number")


def _eval_dirs(root: Path, gt: np.ndarray) -> tuple[Path, Path]:
    pred_dir, gt_dir = root / "p", root / "g"
    pred_dir.mkdir()
    gt_dir.mkdir()
    tifffile.imwrite(pred_dir / "a.tif", (np.arange(64).reshape(8, 8) % 3).astype(np.uint8))
    tifffile.imwrite(gt_dir / "a.tif", gt)
    return pred_dir, gt_dir


def test_evaluate_refuses_a_file_as_out_folder(tmp_path, capsys):
    p, g = _eval_dirs(tmp_path, (np.arange(64).reshape(8, 8) % 3).astype(np.uint8))
    (tmp_path / "afile.txt").write_text("keep me")
    assert main(["evaluate", str(p), str(g), "--out", str(tmp_path / "afile.txt")]) == 2
    _one_line_error(capsys, "afile.txt", "is a file")
    assert (tmp_path / "afile.txt").read_text() == "keep me"


def test_evaluate_never_drops_ground_truth_classes_silently(tmp_path, capsys):
    p, g = _eval_dirs(tmp_path, (np.arange(64).reshape(8, 8) % 3).astype(np.uint8))
    assert main(["evaluate", str(p), str(g), "--n-classes", "1", "--quiet"]) == 2
    _one_line_error(capsys, "class ids up to 2", "--n-classes")
    assert main(["evaluate", str(p), str(g), "--n-classes", "5", "--quiet"]) == 0


@pytest.mark.parametrize("gt, words", [
    ((np.arange(64).reshape(8, 8) % 3) + 0.5, "non-integer values"),
    ((np.arange(64).reshape(8, 8) % 3).astype(np.int16) - 1, "negative class ids"),
])
def test_evaluate_names_ground_truth_that_is_not_class_ids(tmp_path, capsys, gt, words):
    p, g = _eval_dirs(tmp_path, gt)
    assert main(["evaluate", str(p), str(g), "--quiet"]) == 2
    _one_line_error(capsys, "a.tif", words)
    # whole-numbered floats are class ids
    tifffile.imwrite(g / "a.tif", (np.arange(64).reshape(8, 8) % 3).astype(np.float32))
    assert main(["evaluate", str(p), str(g), "--quiet"]) == 0


def test_quiet_keeps_library_warnings_off_stderr(tmp_path):
    """tifffile's log lines and NumPy's RuntimeWarnings on odd inputs are not shown with
    --quiet; the problem lines are (a subprocess: pytest would catch the warnings)."""
    import subprocess
    import sys

    from napari_stego import StegoModel

    data, _ = _texture_files(tmp_path)
    odd = tmp_path / "odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    huge = rng.random((64, 64)) * 1e300
    huge[0, 0] = -1e308
    tifffile.imwrite(odd / "huge_values.tif", huge)
    tifffile.imwrite(odd / "ij.tif", rng.integers(0, 255, (2, 64, 64), np.uint8), imagej=True,
                     metadata={"axes": "ZYX"})
    with tifffile.TiffFile(odd / "ij.tif", mode="r+b") as tif:  # a lying ImageJ header
        tif.pages[0].tags["ImageDescription"].overwrite("ImageJ=1.11a\nimages=7\nslices=7\n")
    (odd / "broken.tif").write_bytes(b"not a tiff")
    model = StegoModel.fit([tifffile.imread(data / "tex0.tif")], 2, backbone="efficientnet_lite0",
                           steps=1, device="cpu")
    path = model.save(tmp_path / "m.stego")
    for scheduler in ("threads", "processes"):
        proc = subprocess.run([sys.executable, "-m", "napari_stego.cli", "segment", str(path),
                               str(odd), "--out", str(tmp_path / scheduler), "--quiet",
                               "--scheduler", scheduler], capture_output=True, text=True,
                              timeout=300, check=False)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 1 and any("broken.tif" in line for line in lines), lines
        assert all(line.startswith(("napari-stego:", "  failed:", "  skipped:"))
                   for line in lines), lines
