"""Tile geometry: covers, halos, alignment, blending weights, training crops (no models)."""

import numpy as np
import pytest

from napari_stego.errors import StegoError
from napari_stego.tiling import (
    TileConfig,
    cells,
    compute_overhead,
    cover_1d,
    crop_windows,
    effective,
    iter_batches,
    ramp_1d,
    tile_grid,
    tile_weights,
)


@pytest.mark.parametrize("length", [1, 31, 32, 100, 511, 512, 700, 1000, 4099])
@pytest.mark.parametrize("tile,halo,align", [(128, 32, 32), (100, 10, 8), (256, 0, 32), (64, 64, 16)])
def test_cover_1d_partitions_and_aligns(length, tile, halo, align):
    spans = cover_1d(length, tile, halo, align)
    tile_r, halo_r = -(-tile // align) * align, -(-halo // align) * align
    cores = [s.core for s in spans]
    assert cores[0][0] == 0 and cores[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))  # a partition, in order
    for s in spans:
        assert s.read[0] <= s.core[0] < s.core[1] <= s.read[1]
        assert 0 <= s.read[0] and s.read[1] <= length
        for v in (s.core[0], s.read[0]):  # inner boundaries on the backbone's grid
            assert v % align == 0
        if s.core[1] < length:
            assert s.core[1] % align == 0 and s.read[1] in (s.core[1] + halo_r, length)
        if s.core[0] > 0:
            assert s.read[0] == s.core[0] - halo_r
    if length <= tile_r + 2 * halo_r:
        assert spans == [spans[0]] and spans[0].read == (0, length)


def test_tile_grid_reassembles_exactly():
    """stardist's test: writing each tile's core from its read region rebuilds the image."""
    rng = np.random.default_rng(0)
    image = rng.random((333, 517))
    out = np.full_like(image, np.nan)
    for t in tile_grid(image.shape, 96, 32, 32):
        read = image[t.read]
        assert read.shape == t.read_shape
        out[t.core] = read[t.crop]
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("shape,tile,halo", [((333, 517), 96, 32), ((1000, 64), 128, 64),
                                             ((257, 257), 64, 32)])
def test_taper_weights_sum_to_one(shape, tile, halo):
    stride = 8
    total = np.zeros((-(-shape[0] // stride), -(-shape[1] // stride)))
    for t in tile_grid(shape, tile, halo, 32):
        w = tile_weights(t, shape, stride, halo, "taper")
        (r0, r1), (c0, c1) = cells(t.y.read, stride), cells(t.x.read, stride)
        assert w.shape == (r1 - r0, c1 - c0) and w.min() >= 0 and w.max() <= 1
        total[r0:r1, c0:c1] += w
    np.testing.assert_allclose(total, 1, atol=1e-6)


def test_crop_weights_are_the_core():
    shape, stride = (300, 300), 8
    total = np.zeros((38, 38))
    for t in tile_grid(shape, 96, 32, 32):
        w = tile_weights(t, shape, stride, 32, "crop")
        (r0, _), (c0, _) = cells(t.y.read, stride), cells(t.x.read, stride)
        (y0, y1), (x0, x1) = cells(t.y.core, stride), cells(t.x.core, stride)
        assert w.sum() == (y1 - y0) * (x1 - x0)
        assert np.all(w[y0 - r0:y1 - r0, x0 - c0:x1 - c0] == 1)
        total[r0:r0 + w.shape[0], c0:c0 + w.shape[1]] += w
    assert np.all(total == 1)


def test_taper_ramps_fall_towards_the_read_border():
    span = cover_1d(1000, 256, 64, 32)[1]
    w = ramp_1d(span, 1000, 8, 64)
    assert w[0] < 0.1 and w[-1] < 0.1 and w.max() == 1
    assert np.all(np.diff(w[: len(w) // 2]) >= 0) and np.all(np.diff(w[len(w) // 2:]) <= 0)
    edge = cover_1d(1000, 256, 64, 32)[0]  # the image border keeps full weight
    assert ramp_1d(edge, 1000, 8, 64)[0] == 1


def test_crop_windows_cover_and_keep_small_maps_whole():
    assert crop_windows((28, 28), 64) == [(0, 0, 28, 28)]
    assert crop_windows((128, 90), 64) == [(0, 0, 128, 90)]
    crops = crop_windows((300, 129), 64)
    covered = np.zeros((300, 129), int)
    for y, x, h, w in crops:
        assert (h, w) == (64, 64) and y + h <= 300 and x + w <= 129
        covered[y:y + h, x:x + w] += 1
    assert covered.min() >= 1


def test_iter_batches_groups_equal_keys():
    items = [1, 1, 1, 2, 2, 1, 1, 1, 1, 1]
    batches = list(iter_batches(items, lambda v: v, 3))
    assert batches == [[1, 1, 1], [2, 2], [1, 1, 1], [1, 1]]


def test_overhead_and_effective_sizes():
    cfg = TileConfig(tile=500, halo=60)
    assert effective(cfg, 32) == (512, 64)
    assert effective(TileConfig(tile=512, halo=None), 32, default_halo=100) == (512, 128)
    assert compute_overhead((600, 600), TileConfig(tile=512, halo=64), 32) == 1.0  # one tile
    assert 1.0 < compute_overhead((4096, 4096), TileConfig(tile=512, halo=64), 32) < 1.6


def test_config_validation():
    with pytest.raises(StegoError, match="blend"):
        TileConfig(blend="feather")
    with pytest.raises(StegoError, match="tile"):
        TileConfig(tile=0)
    with pytest.raises(StegoError, match="halo"):
        TileConfig(halo=-1)
    with pytest.raises(StegoError, match="batch_size"):
        TileConfig(batch_size=0)
    with pytest.raises(StegoError, match="length"):
        cover_1d(0, 64, 8)


def test_plane_grid_covers_grows_and_cuts_blocks():
    from napari_stego.tiling import PlaneGrid, Span

    grid = PlaneGrid.cover((1000, 300), 256, 64, 32)
    assert grid.ys == tuple(cover_1d(1000, 256, 64, 32)) and grid.xs == (Span((0, 300), (0, 300)),)
    assert grid.tiles() == tile_grid((1000, 300), 256, 64, 32) and not grid.single
    assert grid.cores == (((0, 256), (256, 512), (512, 768), (768, 1000)), ((0, 300),))
    assert grid.chunks == ((256, 256, 256, 232), (300,)) and grid.n_tiles == 4
    assert grid.tile(1, 0).core_shape == (256, 300)
    # a core grown by 40 px for the CRF: clipped to the plane, read with the grid's halo and
    # alignment (its feature cells are the plane's)
    win = grid.grown(1, 0, 40)
    assert win.y == Span((216, 552), (128, 640)) and win.x == Span((0, 300), (0, 300))
    assert all(b % 32 == 0 for b in (*win.y.read, win.y.read[0]))
    assert grid.grown(1, 0, 0) == grid.tile(1, 0)
    # the CRF's blocks: cut even where one read region would hold the plane, unaligned
    blocks = PlaneGrid.blocks((100, 70), 64, 24)
    assert blocks.cores == (((0, 64), (64, 100)), ((0, 64), (64, 70)))
    assert blocks.tile(1, 1).y == Span((64, 100), (40, 100))
    assert PlaneGrid.cover((100, 70), 64, 24).single
    whole = PlaneGrid.one_piece((50, 40))
    assert whole.whole and whole.single and whole.tile(0, 0).read == (slice(0, 50), slice(0, 40))
