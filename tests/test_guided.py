"""Guided up-sampling of cluster scores: boundaries at the image's edges, not the grid's."""

import math

import numpy as np
import pytest
import torch

from napari_stego import StegoError
from napari_stego.appearance import cell_moments
from napari_stego.predict import PredictConfig, guided_upsample, upsample_code

STRIDE = 8


def _edge_image(h=48, w=64, edge=21):
    """Dark left of column ``edge``, bright from it on (a column inside a cell), with noise."""
    rgb = torch.full((3, h, w), 0.2)
    rgb[:, :, edge:] = 0.8
    return (rgb + 0.01 * torch.randn(1, h, w, generator=torch.Generator().manual_seed(0))
            ).clamp(0, 1)


def _scores_from_cells(rgb):
    """Two clusters scored per cell by the cell's mean brightness, as codes of a dark and a
    bright class would be: ``(1, 2, h, w)``."""
    means, spread = cell_moments(rgb, (rgb.shape[1] // STRIDE, rgb.shape[2] // STRIDE), STRIDE)
    bright = means[:1] * 2 - 1  # -0.6 dark .. +0.6 bright, 0 for a half-and-half cell
    return torch.cat([-bright, bright])[None], means[None], spread[None]


def test_the_boundary_lands_on_the_image_edge():
    edge = 21  # 5 pixels into the third cell (columns 16..23)
    rgb = _edge_image(edge=edge)
    scores, means, spread = _scores_from_cells(rgb)
    guided = guided_upsample(scores, means, spread, rgb[None], STRIDE, 0.05)
    labels = guided.argmax(1)[0]
    assert guided.shape == (1, 2, *rgb.shape[1:])
    assert (labels[:, :edge] == 0).all() and (labels[:, edge:] == 1).all()
    # bilinear up-sampling of the same scores misplaces it by pixels along every row
    bilinear = upsample_code(scores, STRIDE, rgb.shape[1:], rgb.shape[1:]).argmax(1)[0]
    wrong = (bilinear[:, :edge] != 0).sum() + (bilinear[:, edge:] != 1).sum()
    assert wrong >= rgb.shape[1], int(wrong)


def test_a_flat_image_gets_smooth_spatial_weights():
    """Where every cell has one colour the colour weights are equal: each pixel's value is the
    distance-weighted mean of its 3 x 3 cells' scores, so constant scores stay constant and
    a ramp of scores stays monotonic between cell centres."""
    rgb = torch.full((1, 3, 32, 48), 0.5)
    means, spread = cell_moments(rgb[0], (4, 6), STRIDE)
    flat = guided_upsample(torch.full((1, 2, 4, 6), 0.3), means[None], spread[None], rgb,
                           STRIDE, 0.05)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.3))
    ramp = torch.arange(6.0).repeat(4, 1)[None, None]  # score = cell column
    up = guided_upsample(ramp, means[None], spread[None], rgb, STRIDE, 0.05)[0, 0, 16]
    assert (up[4:44].diff() > 0).all()  # between the first and the last cell centre


def test_bands_equal_the_whole_map_and_far_colours_stay_finite():
    gen = torch.Generator().manual_seed(3)
    n, m = 9, 7
    rgb = torch.rand(1, 3, n * STRIDE - 5, m * STRIDE - 3, generator=gen)  # partial cells
    means, spread = cell_moments(rgb[0], (n, m), STRIDE)
    means, spread = means[None], spread[None]
    scores = torch.randn(1, 4, n, m, generator=gen)
    whole = guided_upsample(scores, means, spread, rgb, STRIDE, 0.05)
    for (c0, c1), (r0, r1) in [((2, 7), (24, 48)), ((0, 3), (0, 16)), ((6, 9), (56, 67))]:
        band = guided_upsample(scores[..., c0:c1, :], means[..., c0:c1, :],
                               spread[..., c0:c1, :], rgb[..., r0:r1, 8:40], STRIDE, 0.05,
                               cells=(c0, 0), pixels=(r0, 8))
        torch.testing.assert_close(band, whole[..., r0:r1, 8:40])
    # a pixel far from every cell's colour with a tiny noise floor: weights underflow unless
    # normalised in the log domain
    odd = rgb.clone()
    odd[..., 30, 30] = torch.tensor([1.0, 0.0, 1.0])
    tight = guided_upsample(scores, torch.zeros_like(means), torch.zeros_like(spread), odd,
                            STRIDE, 1e-3)
    assert torch.isfinite(tight).all()


@pytest.mark.parametrize("guide", [0, -0.1, math.nan, math.inf, True, "0.05"])
def test_bad_guide_values_are_refused(guide):
    with pytest.raises(StegoError, match="guide"):
        PredictConfig(guide=guide)


def test_none_and_positive_guides_are_accepted():
    assert PredictConfig(guide=None).guide is None
    assert PredictConfig().guide == 0.05 and np.isfinite(PredictConfig(guide=1).guide)


def test_guided_scores_of_a_whole_image_put_the_boundary_on_its_edge_at_any_size():
    """``guided_scores`` (the whole-image path, also the linear probe's): the cells' moments
    computed for the caller equal the ones passed in, and an image the backbone saw
    up-sampled 2x comes back at its own size with the boundary on its edge."""
    from napari_stego.predict import guided_scores

    edge = 21
    rgb = _edge_image(edge=edge)
    scores, means, spread = _scores_from_cells(rgb)
    own = guided_scores(scores, rgb, tuple(rgb.shape[1:]), STRIDE, 0.05)
    given = guided_scores(scores, rgb, tuple(rgb.shape[1:]), STRIDE, 0.05, (means, spread))
    torch.testing.assert_close(own, given)
    torch.testing.assert_close(own, guided_upsample(scores, means, spread, rgb[None], STRIDE,
                                                    0.05))
    half = (rgb.shape[1] // 2, rgb.shape[2] // 2)  # the original image; rgb is its 2x work
    small = guided_scores(scores, rgb, half, STRIDE, 0.05)
    labels = small.argmax(1)[0]
    assert small.shape == (1, 2, *half)
    assert (labels[:, : edge // 2] == 0).all() and (labels[:, edge // 2 + 1:] == 1).all()
