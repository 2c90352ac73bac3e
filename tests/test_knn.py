"""Training units, their descriptors and the KNN table."""

import torch

from napari_stego import knn
from napari_stego.knn import (
    Unit,
    crop_window,
    descriptor_chunks,
    knn_table,
    make_units,
    table_chunks,
    unit_descriptors,
)


def test_units_are_whole_map_and_five_crops():
    units = make_units([(20, 30)])
    assert units[0] == Unit(0, 0, 0, 20, 30)
    assert len(units) == 6
    assert all(u.h == 10 and u.w == 15 for u in units[1:])
    corners = {(u.y, u.x) for u in units[1:]}
    assert corners == {(0, 0), (0, 15), (10, 0), (10, 15), (5, 7)}


def test_knn_excludes_self_and_finds_similar_images():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    maps = [a[:, None, None].expand(8, 6, 6) + 0.01 * torch.randn(8, 6, 6, generator=g) for _ in range(3)]
    maps += [b[:, None, None].expand(8, 6, 6) + 0.01 * torch.randn(8, 6, 6, generator=g) for _ in range(3)]
    units = make_units([m.shape[-2:] for m in maps])
    table = knn_table(unit_descriptors(maps, units), k=7)
    assert table.shape == (len(units), 7)
    assert not torch.any(table == torch.arange(len(units))[:, None])
    group = torch.tensor([u.image // 3 for u in units])
    assert torch.all(group[table] == group[:, None])  # neighbours come from the same kind


def test_single_tiny_image_has_partners():
    units = make_units([(1, 1)])
    table = knn_table(unit_descriptors([torch.randn(4, 1, 1)], units), k=7)
    assert table.tolist() == [[0]]
    units = make_units([(4, 4)])
    table = knn_table(unit_descriptors([torch.randn(4, 4, 4)], units), k=7)
    assert table.shape == (6, 5)


def test_crop_window_size_and_content():
    fmap = torch.arange(2 * 10 * 12, dtype=torch.float32).reshape(2, 10, 12)
    g = torch.Generator().manual_seed(0)
    crop = crop_window(fmap, Unit(0, 2, 3, 6, 8), 4, g)
    assert crop.shape == (2, 4, 4)
    # the crop is a contiguous block inside the unit
    y, x = divmod(int(crop[0, 0, 0]), 12)
    assert 2 <= y <= 4 and 3 <= x <= 7
    torch.testing.assert_close(crop, fmap[:, y:y + 4, x:x + 4])
    small = crop_window(fmap, Unit(0, 0, 0, 3, 3), 5, g)  # resized up
    assert small.shape == (2, 5, 5)


def test_sample_vectors_draws_from_every_map_without_exceeding_n():
    from napari_stego.knn import sample_vectors

    maps = [torch.full((3, 10, 10), float(i)).half() for i in range(4)]
    out = sample_vectors(maps, 40, torch.Generator().manual_seed(0))
    assert out.shape == (40, 3) and out.dtype == torch.float32
    assert sorted(set(out[:, 0].tolist())) == [0.0, 1.0, 2.0, 3.0]
    assert sample_vectors(maps, 10_000, torch.Generator()).shape == (400, 3)


def test_pair_points_read_the_windows_of_draw_pairs():
    """``draw_pair_points`` samples the maps where ``draw_pairs``' windows would be sampled;
    on a linear ramp (which bilinear resizing keeps, away from the clamped border) resized
    small units agree too."""
    from napari_stego.knn import draw_pair_points, draw_pairs
    from napari_stego.loss import sample_points

    def ramp(h, w):
        yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        return torch.stack([yy + 2 * xx, 3 * yy - xx, yy * 0 + 1])

    big = [ramp(12, 12 + 2 * i) for i in range(3)]
    for fmaps, window in ((big, 4), (big + [ramp(5, 6)], 4), (big, 9)):  # 9 > every crop: resized
        units = make_units([tuple(m.shape[-2:]) for m in fmaps])
        table = knn_table(unit_descriptors(fmaps, units), 2)
        feats, pos = draw_pairs(fmaps, units, table, 6, window, torch.Generator().manual_seed(2))
        pts = draw_pair_points(fmaps, units, table, 6, window, 5, torch.Generator().manual_seed(2))
        assert pts.anchor1.shape == pts.anchor2.shape == pts.partner.shape == (6, 3, 5, 5)
        for want, got in ((sample_points(feats, pts.coords1), pts.anchor1),
                          (sample_points(feats, pts.coords2), pts.anchor2),
                          (sample_points(pos, pts.coords2), pts.partner)):
            err = (want - got).abs()
            assert float(err.mean()) < 0.05
            if fmaps is big and window == 4:  # nothing resized: the same numbers
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_descriptors_and_table_in_chunks_equal_the_whole_computation(monkeypatch):
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(8, 5 + i % 3, 6, generator=g) for i in range(40)]
    units = make_units([m.shape[-2:] for m in maps])
    n = len(units)  # 240 units
    whole = torch.nn.functional.normalize(torch.stack([
        maps[u.image][:, u.y:u.y + u.h, u.x:u.x + u.w].mean(dim=(1, 2)) for u in units]), dim=1)
    sims = whole @ whole.T
    sims.fill_diagonal_(-float("inf"))
    expected = sims.topk(7, dim=1).indices
    calls = []
    desc = unit_descriptors(maps, units, on_chunk=lambda: calls.append("d"))
    torch.testing.assert_close(desc, whole)
    assert torch.equal(knn_table(desc, 7, on_chunk=lambda: calls.append("t")), expected)
    assert calls.count("d") == len(descriptor_chunks(n)) == knn.KNN_PROGRESS_CHUNKS
    assert calls.count("t") == len(table_chunks(n)) == knn.KNN_PROGRESS_CHUNKS
    # many units: each chunk of rows stays under the element limit, same table
    monkeypatch.setattr(knn, "KNN_CHUNK_ELEMENTS", 5 * n)
    assert all((stop - start) * n <= 5 * n for start, stop in table_chunks(n))
    assert len(table_chunks(n)) == n // 5
    assert torch.equal(knn_table(desc, 7), expected)
