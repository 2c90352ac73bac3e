"""The STEGO segmentation head: features ``(B, D, h, w)`` -> codes ``(B, K, h, w)``."""

from __future__ import annotations

import torch
from torch import nn


class SegmentationHead(nn.Module):
    """Linear 1x1 branch plus 1x1-ReLU-1x1 branch, summed (the reference "nonlinear" head).

    In training mode one channel dropout (p = ``dropout``) is drawn independently for the
    input of each branch; in eval mode it is the identity.

    Args:
        in_dim: feature channels ``D``.
        code_dim: code channels ``K`` (70 by default, as the paper).
        dropout: channel-dropout probability.
    """

    def __init__(self, in_dim: int, code_dim: int = 70, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.code_dim = code_dim
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, code_dim, 1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, code_dim, 1)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` -> ``(B, K, h, w)``."""
        return self.linear(self.dropout(feats)) + self.nonlinear(self.dropout(feats))


@torch.inference_mode()
def map_codes(head: SegmentationHead, feats, device: torch.device | str) -> torch.Tensor:
    """Codes ``(K, h, w)`` float32 on ``device`` of one feature map ``(D, h, w)``: a tensor, or
    a lazy map (a training crop of a feature store) with ``load()``."""
    m = feats if isinstance(feats, torch.Tensor) else feats.load()
    return head(m.to(device, torch.float32)[None])[0].float()


@torch.no_grad()
def init_from_features(head: SegmentationHead, vectors: torch.Tensor) -> SegmentationHead:
    """Start the head as the best rank-``K`` map of the features' cosine geometry.

    The linear branch becomes the projection on the top ``K`` (uncentred) principal directions
    of ``vectors (N, D)``, without bias; the nonlinear branch's output layer starts at zero, so
    at step 0 ``code . code'`` approximates ``f . f'`` as closely as any rank-``K`` linear map
    can. With the default random initialisation the codes of small-scale features are
    dominated by the random biases, and k-means on them starts far from k-means on the
    features. Returns ``head``.
    """
    vectors = vectors.float()
    _, _, vh = torch.linalg.svd(vectors, full_matrices=False)  # rows: principal directions
    k = min(head.code_dim, vh.shape[0])
    weight = head.linear.weight  # (K, D, 1, 1)
    weight[:k] = vh[:k, :, None, None].to(weight)
    head.linear.bias.zero_()
    head.nonlinear[2].weight.zero_()
    head.nonlinear[2].bias.zero_()
    return head
