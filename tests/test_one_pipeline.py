"""One pipeline from every entry point (issue 16): the same labels (ids 1..K), files and
metadata from the API, the CLI, the Segment widget and the demo path; outputs other tools
read (axes, pixel size, OME-Zarr); multichannel fluorescence from the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_stego.cli import main
from napari_stego.labels import common, read_own_metadata, save_labels, to_ids

PIXEL = 0.2  # µm
SPACING = 1.0  # µm between planes


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory, mosaics):
    """A ZYX uint16 stack with a 0.2 µm pixel size and 1 µm spacing (an ImageJ TIFF, as
    Fiji saves it), whose planes have different intensity ranges (so a stack-wide mapping
    and per-plane ones would give different labels)."""
    images, _ = mosaics
    planes = [im[:64, :80].astype(np.uint16) * (40 + 30 * i) for i, im in enumerate(images[:3])]
    path = tmp_path_factory.mktemp("stack") / "cells.tif"
    tifffile.imwrite(path, np.stack(planes), imagej=True, resolution=(1 / PIXEL, 1 / PIXEL),
                     metadata={"axes": "ZYX", "spacing": SPACING, "unit": "um"})
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, untrained_model):
    return untrained_model.save(tmp_path_factory.mktemp("model") / "m.stego")


def _read(path):
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].asarray(), read_own_metadata(tif), tif.series[0].axes


EXPECTED = {"label_offset": 1, "n_clusters": 3, "axes": "ZYX", "scale": [SPACING, PIXEL, PIXEL],
            "unit": "µm", "crf": None}


def _check_common(meta):
    got = common(meta)
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value) if key == "scale" else got[key] == value, key
    return got


def test_api_cli_and_demo_path_give_the_same_labels_and_metadata(stack_file, model_file,
                                                                  untrained_model, tmp_path):
    from napari_stego._reader import read_tiff
    from napari_stego.segment import save_segmentation, tiff_scale

    model = untrained_model
    # the Python API: predict_lazy gives 0-based indices; written with save_labels
    lazy = model.predict_lazy(stack_file)
    scale, unit = tiff_scale(stack_file, "ZYX")
    api = save_labels(tmp_path / "api.tif", lazy, n_clusters=3, axes="ZYX", scale=scale,
                      unit=unit)
    # the CLI (batch job: planes on workers, the stack's intensity mapping measured once)
    assert main(["segment", str(model_file), str(stack_file), "--out", str(tmp_path / "cli"),
                 "--quiet", "--device", "cpu"]) == 0
    # the demo's path
    demo = save_segmentation(model, stack_file, tmp_path / "demo.tif")

    ids = to_ids(lazy.compute(), 3)
    assert ids.min() >= 1 and ids.max() <= 3 and len(np.unique(ids)) > 1
    metas = []
    for path in (api, tmp_path / "cli" / "cells.tif", demo):
        labels, meta, axes = _read(path)
        np.testing.assert_array_equal(labels, ids)
        assert labels.dtype == np.uint8 and axes == "ZYX"
        metas.append(_check_common(meta))
        # the reader: a Labels layer at the stack's scale, with its axes
        [(_, kwargs, kind)] = read_tiff(path)
        assert kind == "labels"
        assert kwargs["scale"] == pytest.approx((SPACING, PIXEL, PIXEL))
        assert kwargs["axis_labels"] == ("Z", "Y", "X")
    assert metas[0] == metas[1] == metas[2]
    # ... the same scale napari-stego's reader gives the image itself
    [(_, image_kwargs, kind)] = read_tiff(stack_file)
    assert kind == "image" and image_kwargs["scale"] == pytest.approx((SPACING, PIXEL, PIXEL))
    # other tools: ImageJ metadata and resolution tags
    with tifffile.TiffFile(tmp_path / "cli" / "cells.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == SPACING
        num, den = tif.pages.first.tags["XResolution"].value
        assert den / num == pytest.approx(PIXEL)


def test_per_plane_intensities_would_differ(stack_file, untrained_model):
    """The stack above is a real test of 'one mapping per stack': segmenting its planes one
    by one (each with its own percentiles) gives other labels."""
    stack = tifffile.imread(stack_file)
    lazy = untrained_model.predict_lazy(stack_file).compute()
    per_plane = np.stack([untrained_model.predict(p) for p in stack])
    assert (per_plane != lazy).any()


@pytest.mark.gui
def test_segment_widget_gives_the_same_labels_and_file(stack_file, untrained_model, tmp_path,
                                                       make_napari_viewer, qtbot):
    pytest.importorskip("pytestqt")
    from napari_stego._reader import read_tiff
    from napari_stego._widgets import SegmentWidget, model_store
    from napari_stego._writer import write_labels

    viewer = make_napari_viewer()
    [(data, kwargs, _)] = read_tiff(stack_file)
    viewer.add_image(data, **kwargs)
    model_store(viewer).set(untrained_model, "test")
    seg = SegmentWidget(viewer)
    job = seg.segment()
    qtbot.waitUntil(lambda: job.finished, timeout=240_000)
    assert job.error is None, job.error
    layer = viewer.layers["cells clusters"]
    ids = to_ids(untrained_model.predict_lazy(stack_file).compute(), 3)
    np.testing.assert_array_equal(layer.data, ids)
    _check_common(layer.metadata["napari_stego"])
    # File > Save layer: napari-stego's writer keeps the same metadata
    state = layer._get_state()
    [path] = write_labels(str(tmp_path / "widget.tif"), state.pop("data"), state)
    labels, meta, _ = _read(path)
    np.testing.assert_array_equal(labels, ids)
    _check_common(meta)


@pytest.mark.parametrize("n, channels", [(2, "0,1,1"), (4, "pca")])
def test_multichannel_fluorescence_fits_and_segments_from_the_cli(tmp_path, mosaics, n,
                                                                   channels, capsys):
    images, _ = mosaics
    chans = np.stack([images[i % len(images)][:64, :72].astype(np.uint16) * (50 + 20 * i)
                      for i in range(n)])
    data = tmp_path / "data"
    data.mkdir()
    for k in range(2):
        tifffile.imwrite(data / f"cells{k}.tif", np.roll(chans, 7 * k, axis=-1), imagej=True,
                         metadata={"axes": "CYX"})
    model = tmp_path / "fluo.stego"
    fit = ["fit", str(data), "--out", str(model), "--backbone", "efficientnet_lite0",
           "--steps", "2", "--n-clusters", "3", "--device", "cpu", "--quiet"]
    assert main(fit) == 2  # without --channels: one line saying what to pass
    err = capsys.readouterr().err
    assert "--channels" in err and f"has {n} channels" in err
    assert main([*fit, "--channels", channels]) == 0
    out = tmp_path / "labels"
    assert main(["segment", str(model), str(data), "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    for k in range(2):
        labels, meta, axes = _read(out / f"cells{k}.tif")
        assert labels.shape == (64, 72) and axes == "YX"
        assert labels.min() >= 1 and labels.max() <= 3 and meta["label_offset"] == 1
    from napari_stego import StegoModel

    stored = StegoModel.load(model).feature_config.intensity.channels
    assert stored == ("pca" if channels == "pca" else (0, 1, 1))
    # the CRF's colours come from the same channels: --crf works on these files too
    assert main(["segment", str(model), str(data), "--out", str(tmp_path / "crf"), "--crf",
                 "--crf-backend", "torch", "--quiet", "--device", "cpu"]) == 0
    labels, meta, _ = _read(tmp_path / "crf" / "cells0.tif")
    assert labels.min() >= 1 and labels.max() <= 3
    assert meta["crf"]["intensity"]["channels"] == ("pca" if channels == "pca" else [0, 1, 1])
    fitted = StegoModel.load(model)
    plane = np.moveaxis(tifffile.imread(data / "cells0.tif"), 0, -1)
    np.testing.assert_array_equal(fitted.predict(plane, crf=True, crf_backend="torch") + 1,
                                  labels)


def test_ome_zarr_output_reopens_with_its_scale(stack_file, model_file, tmp_path):
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    assert main(["segment", str(model_file), str(stack_file), "--out", str(tmp_path),
                 "--format", "ome-zarr", "--quiet", "--device", "cpu"]) == 0
    assert main(["segment", str(model_file), str(stack_file), "--out", str(tmp_path / "t"),
                 "--quiet", "--device", "cpu"]) == 0
    [node] = list(Reader(parse_url(str(tmp_path / "cells.ome.zarr")))())
    assert [t["scale"] for t in node.metadata["coordinateTransformations"][0]] == \
        [pytest.approx([SPACING, PIXEL, PIXEL])]
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    assert node.metadata["axes"][-1]["unit"] == "micrometer"
    np.testing.assert_array_equal(np.asarray(node.data[0]),
                                  tifffile.imread(tmp_path / "t" / "cells.tif"))
    # a finished OME-Zarr output is recognised on a re-run
    again = main(["segment", str(model_file), str(stack_file), "--out", str(tmp_path),
                  "--format", "ome-zarr", "--device", "cpu"])
    assert again == 0


def test_save_segmentation_of_a_zarr_path(untrained_model, mosaics, tmp_path):
    """A zarr array given by its path is segmented and written (its pixel size is not
    looked up in a TIFF that is not there)."""
    import zarr

    plane = mosaics[0][0][:64, :80].astype(np.uint16) * 40
    zarr.open_array(str(tmp_path / "img.zarr"), mode="w", shape=plane.shape,
                    dtype=plane.dtype)[...] = plane
    from napari_stego.segment import save_segmentation

    out = save_segmentation(untrained_model, tmp_path / "img.zarr", tmp_path / "z.tif")
    ids, meta, _ = _read(out)
    np.testing.assert_array_equal(ids, untrained_model.predict(plane) + 1)
    assert meta["axes"] == "YX" and meta["scale"] == [1.0, 1.0]


def test_ome_zarr_pyramid_for_big_planes(tmp_path):
    pytest.importorskip("ome_zarr")
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from napari_stego.labels import label_metadata
    from napari_stego.ngff import finish, pyramid_factors

    assert pyramid_factors((1024, 800)) == [] and pyramid_factors((2100, 900)) == [2, 4]
    labels = (np.arange(2100 * 90).reshape(2100, 90) % 7 + 1).astype(np.uint8)
    group = zarr.open_group(str(tmp_path / "big.ome.zarr"), mode="w", zarr_format=3)
    group.create_array("0", shape=labels.shape, dtype=labels.dtype, chunks=(512, 90))[...] = labels
    finish(tmp_path / "big.ome.zarr", label_metadata(7, "YX", [0.5, 0.5], "µm"))
    [node] = list(Reader(parse_url(str(tmp_path / "big.ome.zarr")))())
    assert [d.shape for d in node.data] == [(2100, 90), (1050, 45), (525, 23)]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    np.testing.assert_array_equal(np.asarray(node.data[2]), labels[::4, ::4])  # ids intact


def test_old_zero_based_outputs_are_recomputed_not_resumed(stack_file, model_file, tmp_path,
                                                           capsys):
    """An output of an older napari-stego (0-based labels, no ``label_offset``) is made again
    with ids 1..K on a re-run, never kept as finished."""
    import json

    out = tmp_path / "out"
    assert main(["segment", str(model_file), str(stack_file), "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    ids, meta, _ = _read(out / "cells.tif")
    old = {k: v for k, v in meta.items() if k not in ("label_offset", "labels")}
    tifffile.imwrite(out / "cells.tif", ids - 1, photometric="minisblack",
                     metadata={"napari_stego": json.dumps(old)})
    assert main(["segment", str(model_file), str(stack_file), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "holds 0-based labels" in capsys.readouterr().err
    again, meta, _ = _read(out / "cells.tif")
    np.testing.assert_array_equal(again, ids)
    assert meta["label_offset"] == 1


def test_crf_settings_reach_predict_and_the_outputs(stack_file, model_file, untrained_model,
                                                   tmp_path):
    from napari_stego.crf import CRFConfig

    plane = tifffile.imread(stack_file)[0]
    # 0 mean-field iterations keep the unaries' argmax: the settings are used, not defaults
    np.testing.assert_array_equal(untrained_model.predict(plane, crf=CRFConfig(iterations=0),
                                                          crf_backend="torch"),
                                  untrained_model.predict(plane))
    assert main(["segment", str(model_file), str(stack_file), "--out", str(tmp_path), "--crf",
                 "--crf-backend", "torch", "--quiet", "--device", "cpu"]) == 0
    labels, meta, _ = _read(tmp_path / "cells.tif")
    assert meta["crf"]["backend"] == "torch" and meta["crf"]["iterations"] == 10
    assert meta["settings"]["crf"] == meta["crf"] and labels.min() >= 1
