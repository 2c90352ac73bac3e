"""Batch jobs never destroy what they did not write, and one bad file never sinks a job:
foreign files at output names, name clashes across runs, TIFF headers that lie about their
size, metadata of the wrong type, killed parents of worker processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stego import batch, segment_files


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, mosaics, untrained_model):
    """An untrained 3-cluster model on the offline backbone, saved, and two 64 px inputs."""
    root = tmp_path_factory.mktemp("safety")
    images, _ = mosaics
    model = untrained_model
    model_path = model.save(root / "tex.stego")
    data = root / "data"
    data.mkdir()
    for i in range(2):
        tifffile.imwrite(data / f"good_{i}.tif", images[i][:64, :64].astype(np.uint16) * 200)
    return model, model_path, data


def _tree(path: Path) -> dict:
    """Every file under ``path`` (or the file itself) -> its SHA-256."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ item 1: foreign files
def test_a_users_zarr_folder_next_to_its_tiff_is_never_deleted(fitted, tmp_path):
    import zarr

    _, model_path, data = fitted
    d = tmp_path / "d"
    d.mkdir()
    tifffile.imwrite(d / "cells_01.tif", tifffile.imread(data / "good_0.tif"))
    group = zarr.open_group(str(d / "cells_01.zarr"), mode="w")  # an OME-Zarr-like group
    group.create_array("0", shape=(4, 4), dtype="u1")[...] = 7
    group.attrs["multiscales"] = [{"datasets": [{"path": "0"}]}]
    before = _tree(d / "cells_01.zarr")
    report = segment_files(model_path, d, d, format="zarr")
    [result] = report.results
    assert result.status == "failed" and report.exit_code == 1
    assert str(d / "cells_01.zarr") in result.message and "napari-stego" in result.message
    assert "move or rename it" in result.message
    # a folder that is not napari-stego's is never deleted, not even with overwrite
    assert segment_files(model_path, d, d, format="zarr", overwrite=True).failed == 1
    assert _tree(d / "cells_01.zarr") == before


@pytest.mark.parametrize("what", ["text", "folder", "tiff_magic", "tiff_of_someone"])
def test_whatever_is_in_the_way_is_left_alone_and_named(fitted, tmp_path, what):
    _, model_path, data = fitted
    out = tmp_path / "out"
    out.mkdir()
    target = out / "good_0.tif"
    if what == "text":
        target.write_text("my notes, not an image\n")
    elif what == "folder":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    elif what == "tiff_magic":
        target.write_bytes(b"II*\0 garbage")
    else:
        tifffile.imwrite(target, np.zeros((8, 8), np.uint8))
    before = _tree(target)
    report = segment_files(model_path, data, out)
    failed = {Path(r.input).name: r.message for r in report.results if r.status == "failed"}
    assert list(failed) == ["good_0.tif"], report
    hint = "move or rename it" if what == "folder" else "pass overwrite (--overwrite)"
    assert str(target) in failed["good_0.tif"] and hint in failed["good_0.tif"]
    assert _tree(target) == before
    assert (out / "good_1.tif").is_file() and report.exit_code == 1
    # --overwrite is the user's explicit permission for files; a folder stays refused
    forced = segment_files(model_path, data, out, overwrite=True)
    if what == "folder":
        assert forced.failed == 1 and _tree(target) == before
    else:
        assert forced.exit_code == 0 and tifffile.imread(target).shape == (64, 64)


def test_a_foreign_probabilities_file_is_left_alone(fitted, tmp_path):
    _, model_path, data = fitted
    out = tmp_path / "out"
    out.mkdir()
    (out / "good_0_proba.tif").write_text("not ours")
    report = segment_files(model_path, [data / "good_0.tif"], out, probabilities=True)
    assert report.failed == 1 and str(out / "good_0_proba.tif") in report.results[0].message
    assert (out / "good_0_proba.tif").read_text() == "not ours"


def test_metadata_that_is_not_a_dict_fails_that_file_only(fitted, tmp_path):
    _, model_path, data = fitted
    out = tmp_path / "out"
    out.mkdir()
    for name, meta in (("good_0.tif", json.dumps([1, 2])),
                       ("good_1.tif", json.dumps({"written_by": "napari-stego segment",
                                                  "model": "a string", "input": 3}))):
        tifffile.imwrite(out / name, np.zeros((64, 64), np.uint8),
                         metadata={"napari_stego": meta})
    before = _tree(out)
    report = segment_files(model_path, data, out)
    assert report.failed == 2 and _tree(out) == before
    assert all("overwrite" in r.message for r in report.results)


# ------------------------------------------------------------------ item 2: name clashes
def test_same_base_name_from_another_folder_is_a_clash_not_a_replacement(fitted, tmp_path):
    _, model_path, data = fitted
    da, db, out = tmp_path / "dA", tmp_path / "dB", tmp_path / "out"
    da.mkdir()
    db.mkdir()
    tifffile.imwrite(da / "x.tif", tifffile.imread(data / "good_0.tif"))
    tifffile.imwrite(db / "x.tif", tifffile.imread(data / "good_1.tif"))
    assert segment_files(model_path, da, out).written == 1
    before = _tree(out / "x.tif")
    notes: list[str] = []
    report = segment_files(model_path, db, out, log=notes.append)
    [result] = report.results
    assert result.status == "failed" and report.exit_code == 1
    assert str((da / "x.tif").resolve()) in result.message
    assert not any("recomputing" in n for n in notes)
    assert _tree(out / "x.tif") == before
    # the first input, changed, is still its own output: recomputed as before
    tifffile.imwrite(da / "x.tif", tifffile.imread(data / "good_1.tif"))
    assert segment_files(model_path, da, out).written == 1


# ------------------------------------------------------------------ item 6: lying headers
def _lying_tiff(path: Path, compression=None) -> Path:
    """A 64 x 64 TIFF whose header claims 2**31 - 1 pixels a side."""
    tifffile.imwrite(path, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64),
                     compression=compression)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tags[tag].overwrite(2**31 - 1)
    return path


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_header_claiming_absurd_sizes_fails_alone(fitted, tmp_path, compression):
    _, model_path, data = fitted
    bad = _lying_tiff(tmp_path / "huge.tif", compression)
    out = tmp_path / "out"
    report = segment_files(model_path, [bad, data / "good_0.tif"], out)
    status = {Path(r.input).name: r for r in report.results}
    assert status["huge.tif"].status == "failed", report
    assert "2147483647" in status["huge.tif"].message
    assert status["good_0.tif"].status == "written" and (out / "good_0.tif").is_file()
    assert not (out / batch.WORK_DIR).exists()  # no plan (or job.json) for the bad file


def test_fit_leaves_out_a_lying_header(fitted, tmp_path):
    _, _, data = fitted
    bad = _lying_tiff(tmp_path / "huge.tif")
    with pytest.raises(Exception) as info:  # nothing else to fit on: one clear error
        batch.fit_files([bad], tmp_path / "m.stego", n_clusters=2)
    assert type(info.value).__name__ == "StegoError" and "huge.tif" in str(info.value)


def test_the_reader_declines_a_lying_header(tmp_path):
    from napari_stego._reader import napari_get_reader

    assert napari_get_reader(str(_lying_tiff(tmp_path / "huge.tif", "zlib"))) is None


# ------------------------------------------------------------------ item 8: killed parent
def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_parent_ends_its_worker_processes(fitted, tmp_path, sig):
    import psutil

    _, model_path, data = fitted
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):
        tifffile.imwrite(many / f"m{i:02d}.tif", tifffile.imread(data / f"good_{i % 2}.tif"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_stego.cli", "segment", str(model_path), str(many),
         "--out", str(tmp_path / "out"), "--scheduler", "processes", "--workers", "2",
         "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # a group of its own: cleaned up below whatever happens
    try:
        deadline = time.monotonic() + 120
        kids: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            if len(kids) >= 3 and any((tmp_path / "out").glob("m*.tif")):
                break  # the resource tracker and two workers, at work
            time.sleep(0.2)
        assert proc.poll() is None and len(kids) >= 3, "the job ended before the kill"
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs([psutil.Process(k) for k in kids
                                      if psutil.pid_exists(k)], timeout=20)
        assert not alive, f"still running after the parent was killed: {alive}"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
