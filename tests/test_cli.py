"""The napari-stego command: demo and weights sub-commands."""

from pathlib import Path

import numpy as np
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
