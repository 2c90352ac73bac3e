"""The TIFF reader (lazy, channel axis from metadata) and the labels writer, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_stego._reader import napari_get_reader, read_tiff
from napari_stego._writer import write_labels
from napari_stego.labels import read_own_metadata


def _layer_meta(name="tex clusters", scale=(1.0, 0.5, 0.5)):
    return dict(name=name, scale=scale, metadata={"napari_stego": dict(
        model=dict(backbone="efficientnet_lite0", n_clusters=3), crf=False, label_offset=1)})


@pytest.mark.parametrize("top, dtype", [(3, np.uint8), (255, np.uint8), (300, np.uint16),
                                        (70_000, np.uint32)])
def test_writer_picks_the_smallest_dtype_and_round_trips(tmp_path, top, dtype):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, top + 1, (3, 40, 50)).astype(np.int64)
    labels[0, 0, 0] = top
    [path] = write_labels(str(tmp_path / "labels.tif"), labels, _layer_meta())
    reader = napari_get_reader(path)
    assert reader is not None
    [(data, kwargs, layer_type)] = reader(path)
    assert layer_type == "labels"
    assert data.dtype == dtype and data.shape == labels.shape
    np.testing.assert_array_equal(np.asarray(data), labels)
    meta = kwargs["metadata"]["napari_stego"]
    assert meta["model"] == dict(backbone="efficientnet_lite0", n_clusters=3)
    assert meta["crf"] is False and kwargs["name"] == "tex clusters"
    assert kwargs["scale"] == (1.0, 0.5, 0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert read_own_metadata(tif)["label_offset"] == 1
        # other tools see the axes and the pixel size: ImageJ hyperstack (uint8 / uint16) or
        # tifffile's shaped TIFF, both with resolution tags
        assert tif.series[0].axes == "ZYX"
        assert tif.is_imagej == (dtype != np.uint32)
        num, den = tif.pages.first.tags["XResolution"].value
        assert num / den == pytest.approx(2.0)  # pixels per unit: 1 / 0.5
    assert kwargs["axis_labels"] == ("Z", "Y", "X")


def test_writer_keeps_units_and_colormap(tmp_path):
    napari = pytest.importorskip("napari")
    from napari.layers import Labels

    from napari_stego.labels import pixel_sizes

    data = np.random.default_rng(2).integers(0, 5, (2, 16, 20)).astype(np.uint8)
    layer = Labels(data, name="seg", scale=(1.5, 0.2, 0.2), axis_labels=("Z", "Y", "X"),
                   units=("um", "um", "um"), colormap={1: "red", 2: "blue", None: "black"})
    state = layer._get_state()
    [path] = write_labels(str(tmp_path / "seg.tif"), state.pop("data"), state)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == 1.5
        assert pixel_sizes(tif, "ZYX") == ({"Z": 1.5, "Y": 0.2, "X": 0.2}, "µm")
    [(back, kwargs, kind)] = read_tiff(path)
    assert kind == "labels"
    viewer_layer = Labels(back, **kwargs)
    assert viewer_layer.scale.tolist() == pytest.approx([1.5, 0.2, 0.2])
    assert tuple(viewer_layer.axis_labels) == ("Z", "Y", "X")
    assert str(viewer_layer.units[-1]) == "micrometer"
    np.testing.assert_allclose(viewer_layer.colormap.map(np.array([1, 2])),
                               layer.colormap.map(np.array([1, 2])))
    assert napari is not None


def test_writer_2d_and_missing_suffix(tmp_path):
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    [path] = write_labels(str(tmp_path / "plain"), labels, dict(name="x", metadata={}))
    assert path.endswith(".tif")
    [(data, kwargs, kind)] = read_tiff(path)
    assert kind == "labels" and kwargs["name"] == "x"
    np.testing.assert_array_equal(np.asarray(data), labels)


def test_writer_writes_lazy_data_plane_by_plane(tmp_path):
    da = pytest.importorskip("dask.array")
    lazy = da.from_array(np.ones((4, 32, 32), np.uint16), chunks=(1, 32, 32)) * 2
    [path] = write_labels(str(tmp_path / "lazy.tif"), lazy, dict(name="lazy", metadata={}))
    [(data, _, _)] = read_tiff(path)
    assert data.dtype == np.uint8 and int(np.asarray(data).sum()) == 2 * 4 * 32 * 32


def test_writer_failing_half_way_keeps_the_earlier_file_and_leaves_no_partial(tmp_path):
    """A lazy layer whose last plane fails while it is written (a remote read that breaks
    after the writer's passes for the dtype, its max and min, went through): the file
    already at the path stays as it was and no half-written file is left."""
    da = pytest.importorskip("dask.array")
    path = tmp_path / "lazy.tif"
    write_labels(str(path), np.ones((4, 64, 64), np.uint8), dict(name="lazy", metadata={}))
    before = path.read_bytes()
    reads = {p: 0 for p in range(4)}

    def boom(block, block_info=None):
        plane = block_info[None]["chunk-location"][0]
        reads[plane] += 1
        if plane == 3 and reads[plane] > 2:
            raise RuntimeError("plane 3 failed")
        return block

    lazy = da.zeros((4, 64, 64), np.uint8, chunks=(1, 64, 64)).map_blocks(boom, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="plane 3 failed"):
        write_labels(str(path), lazy, dict(name="lazy", metadata={}))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lazy.tif"]


def test_reader_is_lazy_and_finds_the_ome_channel_axis(tmp_path):
    stack = np.random.default_rng(1).integers(0, 1000, (5, 2, 64, 80), dtype=np.uint16)
    path = str(tmp_path / "cells.ome.tif")
    tifffile.imwrite(path, stack, ome=True, metadata=dict(
        axes="ZCYX", Channel={"Name": ["membrane", "nuclei"]}, PhysicalSizeX=0.3,
        PhysicalSizeY=0.3, PhysicalSizeZ=1.5))
    [(data, kwargs, kind)] = napari_get_reader(path)(path)
    assert kind == "image"
    assert type(data).__module__.startswith("dask")  # nothing read yet
    assert data.shape == stack.shape
    assert kwargs["channel_axis"] == 1
    assert kwargs["name"] == ["cells membrane", "cells nuclei"]
    assert kwargs["scale"] == (1.5, 0.3, 0.3) and kwargs["axis_labels"] == ("Z", "Y", "X")
    np.testing.assert_array_equal(np.asarray(data[3, 1]), stack[3, 1])


def test_reader_imagej_hyperstack_and_rgb(tmp_path):
    stack = np.zeros((4, 3, 32, 40), np.uint16)
    ij = str(tmp_path / "hyper.tif")
    tifffile.imwrite(ij, stack, imagej=True, metadata={"axes": "ZCYX", "spacing": 2.0},
                     resolution=(2.0, 2.0))
    [(data, kwargs, _)] = read_tiff(ij)
    assert kwargs["channel_axis"] == 1 and kwargs["name"] == ["hyper ch0", "hyper ch1", "hyper ch2"]
    assert kwargs["scale"] == (2.0, 0.5, 0.5)
    rgb = str(tmp_path / "photo.tif")
    tifffile.imwrite(rgb, np.zeros((30, 40, 3), np.uint8), photometric="rgb")
    [(data, kwargs, _)] = read_tiff(rgb)
    assert kwargs.get("rgb") is True and "channel_axis" not in kwargs and data.shape == (30, 40, 3)


def test_reader_declines_what_it_cannot_read(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff at all")
    assert napari_get_reader(str(bad)) is None
    assert napari_get_reader(str(tmp_path / "image.png")) is None
    assert napari_get_reader(str(tmp_path / "missing.tif")) is None
    assert napari_get_reader([]) is None


@pytest.mark.gui
def test_round_trip_through_napari(make_napari_viewer, tmp_path):
    pytest.importorskip("pytestqt")
    viewer = make_napari_viewer()
    labels = np.random.default_rng(2).integers(1, 4, (3, 48, 48)).astype(np.uint8)
    viewer.add_labels(labels, name="tex clusters", metadata=_layer_meta()["metadata"])
    path = str(tmp_path / "saved.tif")
    written = viewer.layers.save(path, selected=False, plugin="napari-stego")
    assert written == [path]
    viewer.layers.clear()
    [layer] = viewer.open(path, plugin="napari-stego")
    assert layer.__class__.__name__ == "Labels" and layer.name == "tex clusters"
    np.testing.assert_array_equal(np.asarray(layer.data), labels)
    assert layer.metadata["napari_stego"]["model"]["n_clusters"] == 3

    stack = np.random.default_rng(3).integers(0, 500, (4, 2, 32, 32), dtype=np.uint16)
    ome = str(tmp_path / "two.ome.tif")
    tifffile.imwrite(ome, stack, ome=True, metadata=dict(axes="ZCYX"))
    layers = viewer.open(ome, plugin="napari-stego")
    assert [lyr.name for lyr in layers] == ["two ch0", "two ch1"]
    assert layers[1].data.shape == (4, 32, 32)


@pytest.mark.parametrize("meta", [[1, 2], "3", {"layer_name": ["x"], "scale": "big"}])
def test_reader_survives_metadata_of_the_wrong_type(tmp_path, meta):
    """A TIFF whose ``napari_stego`` block is a JSON list, a number, or a dict with odd
    values opens (as an image, or as labels without the odd values), never raises."""
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.arange(64, dtype=np.uint8).reshape(8, 8),
                     metadata={"napari_stego": json.dumps(meta)})
    [(data, kwargs, kind)] = napari_get_reader(str(path))(str(path))
    assert data.shape == (8, 8) and kwargs["name"] == "odd"
    assert kind == ("labels" if isinstance(meta, dict) else "image")
    assert "scale" not in kwargs
