"""Batch segmentation: outputs and metadata, resume after a kill, bad inputs, full disk,
bad model files, dask.distributed on a real LocalCluster."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stego import StegoError, StegoModel, batch, segment_files
from napari_stego.batch import inputs as batch_inputs
from napari_stego.batch import tasks, writes
from napari_stego.errors import Cancelled
from napari_stego.labels import read_own_metadata, to_ids


def _ids(model, image, **kwargs):
    """What a labels file holds: ``model.predict``'s 0-based indices as ids 1..K."""
    return to_ids(model.predict(image, **kwargs), model.n_clusters)


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fitted(tmp_path_factory, mosaics, untrained_model):
    """A 3-cluster model on the offline backbone (an untrained head with random centroids:
    batch jobs need a model, not a good one; the CLI test fits a real one), saved, and a
    folder of inputs: three 64 px grey images, a 3-plane stack and an RGB image."""
    root = tmp_path_factory.mktemp("batch")
    images, _ = mosaics
    tiles = [im[:64, :64] for im in images]
    model = untrained_model
    model_path = model.save(root / "tex.stego")
    data = root / "data"
    data.mkdir()
    for i in range(3):
        tifffile.imwrite(data / f"img{i}.tif", (tiles[i].astype(np.uint16) * 200))
    tifffile.imwrite(data / "stack.tif", np.stack(tiles[3:6]), photometric="minisblack")
    rgb = np.stack([tiles[0], tiles[1], tiles[2]], -1)
    tifffile.imwrite(data / "colour.ome.tif", rgb, photometric="rgb")
    return model, model_path, data


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


class _Counter:
    """Wraps ``tasks._predict_plane`` to count (and optionally interrupt) predictions."""

    def __init__(self, monkeypatch, interrupt_at: int | None = None):
        self.calls = 0
        self.lock = threading.Lock()
        real = tasks._predict_plane

        def counted(model, plane, settings, stats=None):
            with self.lock:
                self.calls += 1
                n = self.calls
            if interrupt_at is not None and n == interrupt_at:
                raise KeyboardInterrupt  # as if the job were stopped here
            return real(model, plane, settings, stats)

        monkeypatch.setattr(tasks, "_predict_plane", counted)


# ------------------------------------------------------------------------- outputs
def test_one_labels_file_per_input_with_metadata(fitted, tmp_path):
    model, model_path, data = fitted
    before = _digest(data)
    out = tmp_path / "out"
    report = segment_files(model_path, data, out)
    assert report.exit_code == 0 and report.written == 5, report
    assert _visible(out) == ["colour.tif", "img0.tif", "img1.tif", "img2.tif", "stack.tif"]
    assert not (out / batch.WORK_DIR).exists() and not _partials(out)
    for name in ("img0", "img1", "img2"):
        image = tifffile.imread(data / f"{name}.tif")
        labels = tifffile.imread(out / f"{name}.tif")
        assert labels.shape == image.shape and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, _ids(model, image))
    stack = tifffile.imread(data / "stack.tif")
    labels = tifffile.imread(out / "stack.tif")
    assert labels.shape == (3, 64, 64) and len(np.unique(labels)) > 1
    for i in range(3):
        np.testing.assert_array_equal(labels[i], _ids(model, stack[i]))
    colour = tifffile.imread(out / "colour.tif")
    assert colour.shape == (64, 64)
    np.testing.assert_array_equal(colour, _ids(model, tifffile.imread(data / "colour.ome.tif")))
    with tifffile.TiffFile(out / "stack.tif") as tif:
        meta = read_own_metadata(tif)
    assert meta["model"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert meta["model"]["backbone"] == "efficientnet_lite0" and meta["model"]["n_clusters"] == 3
    assert meta["settings"] == {"crf": None} and meta["package_version"]
    assert meta["label_offset"] == 1 and meta["axes"] == "QYX" and meta["crf"] is None
    assert meta["input"]["path"] == str((data / "stack.tif").resolve())
    assert _digest(data) == before  # inputs are only read


def test_rerun_skips_finished_outputs_and_overwrite_recomputes(fitted, tmp_path, monkeypatch):
    _, model_path, data = fitted
    out = tmp_path / "out"
    segment_files(model_path, data, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    counter = _Counter(monkeypatch)
    again = segment_files(model_path, data, out)
    assert again.existing == 5 and again.exit_code == 0 and counter.calls == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # validated, not just present: a damaged output of ours is recomputed ...
    raw = (out / "img1.tif").read_bytes()
    (out / "img1.tif").write_bytes(raw[:-16])
    notes = []
    fixed = segment_files(model_path, data, out, log=notes.append)
    assert fixed.written == 1 and fixed.existing == 4 and counter.calls == 1
    assert any("recomputing" in n and "img1.tif" in n for n in notes)
    assert tifffile.imread(out / "img1.tif").shape == (64, 64)
    # ... but a file without napari-stego's metadata is not ours to replace
    (out / "img1.tif").write_bytes(b"II*\0 garbage")
    refused = segment_files(model_path, data, out)
    assert refused.failed == 1 and "not written by napari-stego" in refused.problems[0].message
    assert (out / "img1.tif").read_bytes() == b"II*\0 garbage" and counter.calls == 1
    forced = segment_files(model_path, data, out, overwrite=True)
    assert forced.written == 5 and counter.calls == 1 + 7
    assert tifffile.imread(out / "img1.tif").shape == (64, 64)


def test_output_cut_short_is_recomputed(fitted, tmp_path):
    """An existing output whose last plane is cut off (a copy that stopped, a full disk) is
    recomputed; its header and metadata alone would still read."""
    _, model_path, data = fitted
    out = tmp_path / "out"
    segment_files(model_path, data, out)
    whole = tifffile.imread(out / "stack.tif")
    raw = (out / "stack.tif").read_bytes()
    (out / "stack.tif").write_bytes(raw[:-16])
    notes = []
    report = segment_files(model_path, data, out, log=notes.append)
    assert report.written == 1 and report.existing == 4
    assert any("recomputing" in n and "stack.tif" in n for n in notes)
    np.testing.assert_array_equal(tifffile.imread(out / "stack.tif"), whole)


def test_resume_after_sigkill_mid_write(fitted, tmp_path):
    """A real kill -9 while the third file is being written: the file is absent (its
    half-written temporary is hidden), the re-run cleans up and keeps the first two."""
    _, model_path, data = fitted
    out = tmp_path / "out"
    script = f"""
import os, signal, tifffile
real, calls = tifffile.imwrite, []
def imwrite(path, *args, **kwargs):
    calls.append(path)
    real(path, *args, **kwargs)
    if len(calls) == 3:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
tifffile.imwrite = imwrite
from napari_stego.cli import main
main(["segment", {str(model_path)!r}, {str(data)!r}, "--out", {str(out)!r}, "--quiet"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr
    finished = _visible(out)
    assert finished == ["colour.tif", "img0.tif"]  # the files in order, before the kill
    assert len(_partials(out)) == 1  # the half-written one, under a hidden name
    stamps = {n: (out / n).stat().st_mtime_ns for n in finished}
    report = segment_files(model_path, data, out)
    assert report.existing == 2 and report.written == 3 and report.exit_code == 0
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == stamps
    assert not _partials(out)
    assert tifffile.imread(out / "img1.tif").shape == (64, 64)


def test_interrupted_stack_resumes_from_its_finished_planes(fitted, tmp_path, monkeypatch):
    model, model_path, data = fitted
    out = tmp_path / "out"
    counter = _Counter(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        segment_files(model_path, [data / "stack.tif"], out)
    assert _visible(out) == []  # no stack output until every plane is done
    parts = sorted((out / batch.WORK_DIR / "stack").glob("plane_*.npz"))
    assert [p.name for p in parts] == ["plane_0000000.npz", "plane_0000001.npz"]
    counter.calls = 0
    report = segment_files(model_path, [data / "stack.tif"], out)
    assert report.written == 1 and counter.calls == 1  # only the missing plane
    stack = tifffile.imread(data / "stack.tif")
    np.testing.assert_array_equal(tifffile.imread(out / "stack.tif")[2], _ids(model, stack[2]))
    assert not (out / batch.WORK_DIR).exists()


def test_cancel_keeps_finished_files(fitted, tmp_path):
    _, model_path, data = fitted
    cancel = threading.Event()

    def progress(stage, done, total):
        if done >= 1:
            cancel.set()

    with pytest.raises(Cancelled):
        segment_files(model_path, data, tmp_path / "out", progress=progress, cancel=cancel)
    written = _visible(tmp_path / "out")
    assert 1 <= len(written) < 5 and not _partials(tmp_path / "out")


# ------------------------------------------------------------------------- bad inputs
def _bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """name -> the words its one-line message must hold."""
    folder.mkdir()
    raw = good.read_bytes()
    (folder / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    stack = folder / "cut_stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 60000, (3, 64, 64), np.uint16),
                     photometric="minisblack")
    raw_stack = stack.read_bytes()
    stack.write_bytes(raw_stack[: int(len(raw_stack) * 0.6)])  # planes 2 and 3 cut off
    (folder / "garbage.tif").write_bytes(b"this is not a TIFF at all" * 10)
    tifffile.imwrite(folder / "complex.tif", np.ones((16, 16), np.complex64))
    tifffile.imwrite(folder / "channels.tif", np.ones((2, 2, 16, 16), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    nan = np.full((32, 32), np.nan, np.float32)
    tifffile.imwrite(folder / "nan.tif", nan)
    tifffile.imwrite(folder / "constant.tif", np.full((32, 32), 7, np.uint16))
    return {"truncated.tif": "truncated or corrupt", "cut_stack.tif": "truncated or corrupt",
            "garbage.tif": "not a TIFF",
            "complex.tif": "unsupported dtype complex64", "channels.tif": "has 2 channels",
            "nan.tif": "NaN", "constant.tif": "constant image",
            "missing.tif": "does not exist"}


def test_each_bad_input_gets_its_message_and_the_rest_finish(fitted, tmp_path, capsys):
    from napari_stego.cli import main

    _, model_path, data = fitted
    expected = _bad_inputs(tmp_path / "bad", data / "img0.tif")
    out = tmp_path / "out"
    args = ["segment", str(model_path), str(data), str(tmp_path / "bad"),
            str(tmp_path / "bad" / "missing.tif"), "--out", str(out), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    for name, words in expected.items():
        lines = [line for line in err if name in line and words in line]
        assert lines, f"no message for {name} containing {words!r}: {err}"
    assert any("nan.tif" in line and line.strip().startswith("skipped") for line in err)
    assert _visible(out) == ["colour.tif", "img0.tif", "img1.tif", "img2.tif", "stack.tif"]
    assert not _partials(out)


def test_full_disk_reports_and_leaves_no_partial_file(fitted, tmp_path, monkeypatch):
    _, model_path, data = fitted
    real = tifffile.imwrite

    def imwrite(path, *args, **kwargs):
        if ".img1.tif" in str(path):
            Path(path).write_bytes(b"II*\0 half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    out = tmp_path / "out"
    report = segment_files(model_path, data, out)
    [failed] = [r for r in report.results if r.status == "failed"]
    assert failed.input.endswith("img1.tif")
    assert "no space left on device" in failed.message and str(out / "img1.tif") in failed.message
    assert report.written == 4 and report.exit_code == 1
    assert not (out / "img1.tif").exists() and not _partials(out)


def test_outputs_never_replace_inputs_or_foreign_files(fitted, tmp_path):
    _, model_path, data = fitted
    before = _digest(data)
    report = segment_files(model_path, [data / "img0.tif"], data)
    assert report.failed == 1 and "would replace an input" in report.results[0].message
    assert _digest(data) == before
    out = tmp_path / "out"
    out.mkdir()
    tifffile.imwrite(out / "img0.tif", np.zeros((8, 8), np.uint8))  # someone else's file
    report = segment_files(model_path, [data / "img0.tif"], out)
    assert report.failed == 1 and "not written by napari-stego" in report.results[0].message
    assert tifffile.imread(out / "img0.tif").shape == (8, 8)
    report = segment_files(model_path, [data / "img0.tif"], out, overwrite=True)
    assert report.written == 1 and tifffile.imread(out / "img0.tif").shape == (64, 64)


def _rewrite_model(src: Path, dst: Path, **changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["napari_stego"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    meta.update(changes)
    save_file(tensors, str(dst), metadata={"napari_stego": json.dumps(meta)})
    return dst


def test_bad_model_files_stop_the_job_with_one_line(fitted, tmp_path, capsys):
    from napari_stego.cli import main

    _, model_path, data = fitted
    cases = {
        "newer": (_rewrite_model(model_path, tmp_path / "newer.stego", format_version=99,
                                 package_version="9.0"), "newer than this"),
        "weights": (_rewrite_model(model_path, tmp_path / "weights.stego",
                                   weights_fingerprint="0" * 64), "are different"),
        "backbone": (_rewrite_model(model_path, tmp_path / "backbone.stego",
                                    backbone="resnet_from_the_future"), "unknown backbone"),
        "junk": (tmp_path / "junk.stego", "not a napari-stego model file"),
        "missing": (tmp_path / "missing.stego", "does not exist"),
    }
    (tmp_path / "junk.stego").write_bytes(b"junk")
    for path, words in cases.values():
        code = main(["segment", str(path), str(data / "img0.tif"), "--out",
                     str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("napari-stego: error:") and words in err, err
        assert "\n" not in err
    assert not (tmp_path / "out" / "img0.tif").exists()


# ------------------------------------------------------------------------- formats
def test_zarr_with_probabilities(fitted, tmp_path):
    import zarr

    model, _, data = fitted
    report = segment_files(model, [data / "stack.tif", data / "img0.tif"], tmp_path,
                           format="zarr", probabilities=True)
    assert report.exit_code == 0 and report.written == 2
    labels = zarr.open_array(str(tmp_path / "stack.zarr"), mode="r")
    proba = zarr.open_array(str(tmp_path / "stack_proba.zarr"), mode="r")
    assert labels.shape == (3, 64, 64) and proba.shape == (3, 3, 64, 64)
    assert labels.attrs["napari_stego"]["kind"] == "labels"
    np.testing.assert_allclose(proba[...].sum(1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(labels[...], proba[...].argmax(1) + 1)
    assert zarr.open_array(str(tmp_path / "img0.zarr"), mode="r").shape == (64, 64)
    again = segment_files(model, [data / "stack.tif", data / "img0.tif"], tmp_path,
                          format="zarr", probabilities=True)
    assert again.existing == 2
    assert not (tmp_path / batch.WORK_DIR).exists()  # the model object's transport file too


# ------------------------------------------------------------------------- schedulers
def test_local_processes_scheduler(fitted, tmp_path):
    _, model_path, data = fitted
    report = segment_files(model_path, [data / "stack.tif"], tmp_path, scheduler="processes",
                           workers=1)
    assert report.exit_code == 0 and report.written == 1
    [worker] = report.workers  # one worker process did every plane, not this one
    assert not worker.endswith(f":{os.getpid()}")


@pytest.mark.slow
def test_localcluster_gives_the_local_labels(fitted, tmp_path):
    from distributed import Client, LocalCluster

    _, model_path, data = fitted
    local = segment_files(model_path, data, tmp_path / "local")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        remote = segment_files(model_path, data, tmp_path / "dask", scheduler=client)
        loads = client.run(
            lambda: __import__("napari_stego.batch.models").batch.models._MODEL_LOADS)
        # dask work inside a plane (a tiled predictor) stays on the worker's own thread
        inner = client.run(lambda: __import__("dask").config.get("scheduler", None))
        address = cluster.scheduler_address
        again = segment_files(model_path, data, tmp_path / "dask", scheduler=address)
    assert local.exit_code == remote.exit_code == 0 and remote.written == 5
    assert len(remote.workers) == 2  # 7 planes spread over both workers
    assert sorted(loads.values()) == [1, 1]  # one model load per worker, not per plane
    assert set(inner.values()) == {"sync"}
    assert again.existing == 5
    for name in _visible(tmp_path / "local"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "dask" / name),
                                      tifffile.imread(tmp_path / "local" / name))


def test_bad_scheduler_and_unreachable_address(fitted, tmp_path):
    import dask

    _, model_path, data = fitted
    with pytest.raises(StegoError, match="unknown scheduler"):
        segment_files(model_path, data, tmp_path, scheduler="gpu-please")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(StegoError, match="cannot reach the dask scheduler"):
        segment_files(model_path, data, tmp_path, scheduler="tcp://127.0.0.1:1")


# ------------------------------------------------------------------------- big planes: tiles
TILES_CFG = {"tile": 128, "halo": 128}  # planes over 384 px (tile + 2 halo) are tiled


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, offline_backbone):
    """A model with small tiles whose clusters mean something (the head projects the
    features on their 16 main principal components, centred; centroids are k-means of its
    codes), saved; the same model with tiles big enough to predict every image here whole;
    and inputs bigger than one tile: a 512 px grey image, a 512 px RGB photo, a 2-plane
    uint16 stack of 464 x 448 px (all at least ``min_side``, so none is up-sampled)."""
    import torch
    from skimage import data

    from napari_stego.cluster import spherical_kmeans
    from napari_stego.features import extract_features
    from napari_stego.head import SegmentationHead
    from napari_stego.tiling import TileConfig

    root = tmp_path_factory.mktemp("tiled")
    camera = data.camera()
    head = SegmentationHead(offline_backbone.dim, 16).eval()
    with torch.inference_mode():
        feats = extract_features(offline_backbone, camera[::2, ::2]).float()  # (D, h, w)
        vectors = feats.flatten(1).T
        mean = vectors.mean(0)
        axes = torch.linalg.svd(vectors - mean, full_matrices=False).Vh[:16]  # (16, D)
        head.linear.weight.copy_(axes[:, :, None, None])
        head.linear.bias.copy_(-(axes @ mean))
        head.nonlinear[2].weight.zero_()
        head.nonlinear[2].bias.zero_()
        codes = head(feats[None])[0].flatten(1).T
    centroids = spherical_kmeans(codes, 3, seed=0)
    model = StegoModel(offline_backbone, head, centroids, device="cpu",
                       tile_config=TileConfig(**TILES_CFG))
    whole = StegoModel(offline_backbone, head, centroids, device="cpu",
                       tile_config=TileConfig(tile=2048))
    path = model.save(root / "small-tiles.stego")
    big = root / "big"
    big.mkdir()
    tifffile.imwrite(big / "camera.tif", camera)
    tifffile.imwrite(big / "astronaut.tif", data.astronaut(), photometric="rgb")
    stack = np.stack([camera[:464, :448], camera[48:, 64:]]).astype(np.uint16) * 200
    tifffile.imwrite(big / "stack.tif", stack, photometric="minisblack")
    return model, whole, path, big


def _expected_tiles(model, shape2d) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The tile cores ``StegoModel.predict`` cuts a plane into (row-major)."""
    from napari_stego.features import tile_halo
    from napari_stego.tiling import cover_1d

    tile, halo = tile_halo(model.tile_config, model.backbone)
    ys, xs = (cover_1d(n, tile, halo, model.backbone.spec.pad_to) for n in shape2d)
    return [(sy.core, sx.core) for sy in ys for sx in xs]


class _TileSpy:
    """Wraps ``tasks._predict_tile``: records the tile cores predicted (and optionally stops
    the job, as if killed, at call ``interrupt_at``)."""

    def __init__(self, monkeypatch, interrupt_at: int | None = None):
        self.cores: list[tuple] = []
        self.interrupt_at = interrupt_at
        self.lock = threading.Lock()
        real = tasks._predict_tile

        def spy(pred, tile, window, crf_intensity, settings):
            with self.lock:
                self.cores.append((pred.ys[tile[0]].core, pred.xs[tile[1]].core))
                n = len(self.cores)
            if n == self.interrupt_at:
                raise KeyboardInterrupt
            return real(pred, tile, window, crf_intensity, settings)

        monkeypatch.setattr(tasks, "_predict_tile", spy)


def test_big_planes_are_predicted_tile_by_tile(tiled, tmp_path, monkeypatch):
    model, whole, path, big = tiled
    spy = _TileSpy(monkeypatch)
    reads: list[tuple[int, ...]] = []
    real_getitem = batch_inputs._PlaneArray.__getitem__

    def getitem(self, key):
        block = real_getitem(self, key)
        reads.append(block.shape[:2])
        return block

    def whole_plane(*args):
        raise AssertionError("a big plane was read whole by a plane task")

    monkeypatch.setattr(batch_inputs._PlaneArray, "__getitem__", getitem)
    monkeypatch.setattr(tasks, "_read_plane", whole_plane)
    seen: list[tuple] = []
    out = tmp_path / "out"
    inputs = [big / "camera.tif", big / "astronaut.tif"]
    report = segment_files(path, inputs, out, progress=lambda *a: seen.append(a))
    assert report.exit_code == 0 and report.written == 2, report

    expected = _expected_tiles(model, (512, 512))
    assert len(expected) == 16  # 4 x 4 tiles of 128 px
    assert sorted(spy.cores) == sorted(expected * 2)  # each tile of each plane, once
    tiles = [s for s in seen if s[0] == "tiles"]
    assert tiles[0] == ("tiles", 0, 32) and tiles[-1] == ("tiles", 32, 32)
    assert [s for s in seen if s[0] == "segment"][-1] == ("segment", 2, 2)
    # bounded reads: every read is one tile core plus its halo (at most 128 + 2 x 128 px a
    # side), but for the intensity statistics (is a uint8 plane dim?), which read a plane
    # of at most STAT_SAMPLES values whole, once, and bigger ones in 128 px blocks
    big_reads = [r for r in reads if max(r) > 384]
    assert len(reads) >= 32 and big_reads == [(512, 512)] * 2, big_reads

    for name in ("camera", "astronaut"):
        image = tifffile.imread(big / f"{name}.tif")
        labels = tifffile.imread(out / f"{name}.tif")
        assert labels.shape == (512, 512) and labels.dtype == np.uint8
        # the labels StegoModel.predict gives (the same tiles, computed the same way) ...
        np.testing.assert_array_equal(labels, _ids(model, image))
        # ... and those of a whole-plane pass, up to the seams
        agree = (labels == _ids(whole, image)).mean()
        assert agree >= 0.995, (name, agree)
        assert len(np.unique(labels)) == 3
        with tifffile.TiffFile(out / f"{name}.tif") as tif:
            assert tif.pages[0].is_tiled and tif.pages[0].tile == (128, 128)
            meta = read_own_metadata(tif)
        assert meta["complete"] and meta["shape"] == [512, 512] and meta["blank_planes"] == []
    assert _visible(out) == ["astronaut.tif", "camera.tif"]
    assert not (out / batch.WORK_DIR).exists() and not _partials(out)
    again = segment_files(path, inputs, out)
    assert again.existing == 2 and len(spy.cores) == 32  # finished: nothing recomputed


def test_tiled_stack_to_zarr_with_probabilities(tiled, tmp_path):
    import zarr

    model, _, path, big = tiled
    report = segment_files(path, [big / "stack.tif"], tmp_path, format="zarr",
                           probabilities=True)
    assert report.exit_code == 0 and report.written == 1, report
    stack = tifffile.imread(big / "stack.tif")
    labels = zarr.open_array(str(tmp_path / "stack.zarr"), mode="r")
    proba = zarr.open_array(str(tmp_path / "stack_proba.zarr"), mode="r")
    assert labels.shape == (2, 464, 448) and labels.chunks == (1, 128, 128)
    assert proba.shape == (2, 3, 464, 448) and proba.dtype == np.float32
    # the stack's planes, each mapped with the stack's intensities: predict_lazy's labels
    lazy, probs = model.predict_lazy(big / "stack.tif", proba=True)
    np.testing.assert_array_equal(labels[...], to_ids(lazy.compute(), 3))
    np.testing.assert_allclose(proba[...], probs.compute(), atol=1e-6)
    np.testing.assert_array_equal(labels[...], proba[...].argmax(1) + 1)
    assert labels.attrs["napari_stego"]["shape"] == [2, 464, 448]
    again = segment_files(path, [big / "stack.tif"], tmp_path, format="zarr",
                          probabilities=True)
    assert again.existing == 1 and not (tmp_path / batch.WORK_DIR).exists()


def test_tiled_planes_with_crf(tiled, tmp_path):
    model, whole, path, big = tiled
    out = tmp_path / "out"
    report = segment_files(path, [big / "camera.tif"], out, crf=True, probabilities=True)
    assert report.exit_code == 0, report
    image = tifffile.imread(big / "camera.tif")
    labels = tifffile.imread(out / "camera.tif")
    proba = tifffile.imread(out / "camera_proba.tif")
    assert proba.shape == (3, 512, 512)
    np.testing.assert_allclose(proba.sum(0), 1.0, atol=1e-3)
    np.testing.assert_array_equal(labels, proba.argmax(0) + 1)
    refined = _ids(model, image, crf=True)
    assert (labels != _ids(model, image)).mean() > 0.001  # the CRF did change labels
    for reference in (refined, _ids(whole, image, crf=True)):
        agree = (labels == reference).mean()
        assert agree >= 0.995, agree


def test_interrupted_big_plane_resumes_from_its_finished_tiles(tiled, tmp_path, monkeypatch):
    model, _, path, big = tiled
    out = tmp_path / "out"
    spy = _TileSpy(monkeypatch, interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        segment_files(path, [big / "camera.tif"], out)
    assert _visible(out) == []  # no output until every tile is done
    parts = sorted((out / batch.WORK_DIR / "camera").glob("plane_*_tile_*.npz"))
    assert len(parts) >= 5  # the tiles finished before the interruption
    spy.cores.clear()
    spy.interrupt_at = None
    report = segment_files(path, [big / "camera.tif"], out)
    assert report.written == 1 and len(spy.cores) == 16 - len(parts)  # only the missing ones
    np.testing.assert_array_equal(tifffile.imread(out / "camera.tif"),
                                  _ids(model, tifffile.imread(big / "camera.tif")))
    assert not (out / batch.WORK_DIR).exists() and not _partials(out)


def test_cancel_between_tiles_keeps_them_for_the_next_run(tiled, tmp_path, monkeypatch):
    _, _, path, big = tiled
    out = tmp_path / "out"
    spy = _TileSpy(monkeypatch)
    cancel = threading.Event()

    def progress(stage, done, total):
        if stage == "tiles" and done >= 3:
            cancel.set()

    with pytest.raises(Cancelled):
        segment_files(path, [big / "camera.tif"], out, progress=progress, cancel=cancel)
    ran = len(spy.cores)
    assert 3 <= ran < 16 and _visible(out) == [] and not _partials(out)
    seen: list[tuple] = []
    report = segment_files(path, [big / "camera.tif"], out, progress=lambda *a: seen.append(a))
    assert report.written == 1 and len(spy.cores) == 16
    assert next(s for s in seen if s[0] == "tiles") == ("tiles", ran, 16)


def test_bad_big_planes_fail_or_skip_with_one_line(tiled, tmp_path):
    _, _, path, big = tiled
    bad = tmp_path / "bad"
    bad.mkdir()
    tifffile.imwrite(bad / "flat.tif", np.full((400, 416), 7, np.uint16))
    # compressed: its header cannot tell that the file is short, so the first plane runs
    # (an uncompressed one is refused before planning, see test_batch_safety.py)
    tifffile.imwrite(bad / "cut.tif", tifffile.imread(big / "stack.tif"), compression="zlib")
    raw = (bad / "cut.tif").read_bytes()
    (bad / "cut.tif").write_bytes(raw[: int(len(raw) * 0.7)])  # the second plane cut off
    seen: list[tuple] = []
    out = tmp_path / "out"
    report = segment_files(path, [bad, big / "camera.tif"], out,
                           progress=lambda *a: seen.append(a))
    status = {Path(r.input).name: r for r in report.results}
    assert status["camera.tif"].status == "written"
    assert status["flat.tif"].status == "skipped"
    assert "constant image (every pixel is 7)" in status["flat.tif"].message
    assert status["cut.tif"].status == "failed"
    assert "truncated or corrupt" in status["cut.tif"].message
    assert _visible(out) == ["camera.tif"] and not _partials(out)
    # the blank plane's tiles are gone; the cut stack failed while planning (its intensity
    # mapping is measured on the whole stack first), so it left nothing
    assert not (out / batch.WORK_DIR).exists()
    for stage in ("segment", "tiles"):  # the bars end full: work that will not run is dropped
        last = [s for s in seen if s[0] == stage][-1]
        assert last[1] == last[2], last


def test_tile_parts_stitch_into_tiff_tiles_of_another_size(tmp_path, monkeypatch):
    """Output TIFF tiles need not line up with the prediction tiles (a ViT's 8 px-aligned
    tiles, or tiles over 2048 px): each TIFF tile is cut from the parts it overlaps."""
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 5, (2, 250, 130)).astype(np.uint8)
    grid = (((0, 100), (100, 200), (200, 250)), ((0, 100), (100, 130)))
    for flat, plane in enumerate(planes):
        for iy, (y0, y1) in enumerate(grid[0]):
            for ix, (x0, x1) in enumerate(grid[1]):
                core = plane[y0:y1, x0:x1]
                writes._save_tile_part(writes._tile_part_path(tmp_path, flat, (iy, ix)), core,
                                       None, batch_inputs._pixel_range(core))
    assert writes._tiff_tile_side(grid[0], 250) == 256  # 100 px is no TIFF tile size
    assert writes._tiff_tile_side(((0, 1024), (1024, 3000)), 3000) == 1024
    monkeypatch.setattr(writes, "_tiff_tile_side", lambda cores, length: 48)
    layout = batch_inputs._Layout((2, 250, 130), "QYX", "|u1", (1, 2), None, (0,))
    task = tasks._AssembleTask(tasks._Settings(), layout, 5, (), "", None, {}, str(tmp_path),
                               grid)
    out = writes._write_tiled(tmp_path / "out.tif", task, (2, 250, 130), np.dtype(np.uint8),
                              {"complete": True}, ["labels"])
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].tile == (48, 48)
        np.testing.assert_array_equal(tif.asarray(), planes)


def test_taper_blending_keeps_the_whole_plane_path(tiled, tmp_path, monkeypatch):
    """Tapered tiles need the whole plane's feature map: such a model's planes go to one
    worker whole, as before, and still get StegoModel.predict's labels."""
    from napari_stego.tiling import TileConfig

    model, _, _, big = tiled
    taper = StegoModel(model.backbone, model.head, model.centroids, device="cpu",
                       tile_config=TileConfig(**TILES_CFG, blend="taper"))
    path = taper.save(tmp_path / "taper.stego")
    tile_spy, plane_spy = _TileSpy(monkeypatch), _Counter(monkeypatch)
    report = segment_files(path, [big / "camera.tif"], tmp_path / "out")
    assert report.written == 1 and tile_spy.cores == [] and plane_spy.calls == 1
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "camera.tif"),
                                  _ids(taper, tifffile.imread(big / "camera.tif")))


@pytest.mark.slow
def test_tiles_of_one_plane_spread_over_localcluster_workers(tiled, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    _, _, path, big = tiled
    local = segment_files(path, [big / "camera.tif"], tmp_path / "local")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client, \
            get_task_stream(client) as stream:
        remote = segment_files(path, [big / "camera.tif"], tmp_path / "dask", scheduler=client)
    assert local.exit_code == remote.exit_code == 0
    tile_tasks = [t for t in stream.data if str(t["key"]).startswith("_run_tile")]
    assert len(tile_tasks) == 16  # one task per tile of the one plane
    assert len({t["worker"] for t in tile_tasks}) == 2  # ... run by both workers
    assert len(remote.workers) == 2
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "dask" / "camera.tif"),
                                  tifffile.imread(tmp_path / "local" / "camera.tif"))
