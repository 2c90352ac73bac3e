"""save_labels: the labels convention on disk, and no half-written or destroyed file."""

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_stego.labels import read_own_metadata, save_labels


def test_save_labels_writes_ids_with_metadata(tmp_path):
    idx = np.arange(2 * 4 * 5).reshape(2, 4, 5) % 3
    path = save_labels(tmp_path / "l.tif", idx, n_clusters=3, axes="ZYX")
    np.testing.assert_array_equal(tifffile.imread(path), idx + 1)
    with tifffile.TiffFile(path) as tif:
        assert read_own_metadata(tif)["label_offset"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]


def test_a_failing_plane_leaves_the_earlier_file_whole_and_no_partial(tmp_path):
    """A plane that cannot be computed (a lazy prediction failing half-way) must neither
    leave a half-written file nor destroy the one already at the path."""
    path = tmp_path / "l.tif"
    save_labels(path, np.zeros((2, 4, 5), np.uint8), n_clusters=3, axes="ZYX")
    before = path.read_bytes()

    def boom(block, block_info=None):
        if block_info[None]["chunk-location"][0] == 1:
            raise RuntimeError("plane 1 failed")
        return block

    lazy = da.zeros((2, 4, 5), np.uint8, chunks=(1, 4, 5)).map_blocks(boom, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="plane 1 failed"):
        save_labels(path, lazy, n_clusters=3, axes="ZYX")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]
