"""Feature correspondences (the STEGO paper's Fig. 2), without napari: the cosine similarity
of one location's feature vector to every location of an image, and the nearest-neighbour
images of a stack by their pooled features.

Feature maps are ``(D, h, w)`` on the backbone grid of the *work* image (the image after
:mod:`napari_stego.features` up-sampled it to ``min_side``); maps go back to image pixels
the way :func:`napari_stego.predict.upsample_code` does for codes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .features import work_size
from .predict import upsample_code


def grid_cell(point_yx, size: tuple[int, int], fmap_hw: tuple[int, int], stride: int,
              min_side: int) -> tuple[int, int]:
    """The feature-grid cell ``(i, j)`` that holds image pixel ``point_yx`` of an image of
    ``size`` pixels."""
    work = work_size(size, min_side)
    y = (float(point_yx[0]) + 0.5) * work[0] / size[0]
    x = (float(point_yx[1]) + 0.5) * work[1] / size[1]
    i = int(np.clip(y // stride, 0, fmap_hw[0] - 1))
    j = int(np.clip(x // stride, 0, fmap_hw[1] - 1))
    return i, j


def query_vector(fmap: torch.Tensor, point_yx, size: tuple[int, int], stride: int,
                 min_side: int) -> torch.Tensor:
    """The L2-normalised feature vector ``(D,)`` under image pixel ``point_yx``."""
    i, j = grid_cell(point_yx, size, tuple(fmap.shape[-2:]), stride, min_side)
    return F.normalize(fmap[:, i, j].float(), dim=0)


def similarity_map(fmap: torch.Tensor, query: torch.Tensor, size: tuple[int, int], stride: int,
                   min_side: int) -> np.ndarray:
    """Cosine similarity ``(H, W)`` float32 of every location of ``fmap`` to ``query``,
    bilinearly up-sampled to the ``size`` of the image ``fmap`` was computed from."""
    sim = torch.einsum("dhw,d->hw", F.normalize(fmap.float(), dim=0), query.float())
    up = upsample_code(sim[None, None], stride, work_size(size, min_side), tuple(size))
    return up[0, 0].clamp(-1, 1).numpy().astype(np.float32)


def descriptor(fmap: torch.Tensor) -> torch.Tensor:
    """The image's global descriptor: its mean feature, L2-normalised ``(D,)`` (as the KNN
    table of training uses for whole images)."""
    return F.normalize(fmap.float().mean(dim=(1, 2)), dim=0)


def nearest(query_desc: torch.Tensor, descs: dict, k: int, exclude=None) -> list[tuple]:
    """The ``k`` keys of ``descs`` (key -> descriptor) most similar to ``query_desc``, best
    first, as ``(key, cosine)`` pairs; ``exclude`` is left out."""
    keys = [key for key in descs if key != exclude]
    if not keys or k <= 0:
        return []
    mat = torch.stack([descs[key] for key in keys])
    sims = (mat @ query_desc.float()).tolist()
    order = np.argsort(sims)[::-1][:k]
    return [(keys[i], float(sims[i])) for i in order]
