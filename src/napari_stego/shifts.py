"""Choosing the loss shifts from the data's own feature correlations (``shifts="auto"``).

The reference's shifts (0.18 / 0.12 / 0.46) were tuned by hand for DINO ViT-S/8 on natural
photos; other backbones and domains have other correlation levels. With EfficientNet-Lite0
features on EM or blood-smear images, for instance, the spatially centred self and KNN
correlations average about 0.5, so the reference shifts make 94-100 % of the self / KNN pairs
attract and the codes collapse.

The rule: sample feature correlations exactly as training will (same windows, partners, point
sampling and centring), and set each term's shift to the quantile of its own distribution that
leaves a fixed fraction of pairs attracted (``F_sc > b``): a balance of attraction and
repulsion that does not depend on the backbone's correlation scale. No labels are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .knn import Unit, draw_pairs
from .loss import centre_correlation, correlation, negative_permutation, sample_points


@dataclass(frozen=True)
class AutoShiftConfig:
    """Fractions of pairs each term should attract, and how many batches to measure on."""

    self_attract: float = 0.5
    knn_attract: float = 0.4
    rand_attract: float = 0.1
    n_batches: int = 8


@torch.no_grad()
def sample_correlations(maps: Sequence[torch.Tensor], units: Sequence[Unit], table: torch.Tensor, *,
                        window: int, batch_size: int, feature_samples: int, n_batches: int,
                        gen: torch.Generator, pointwise: bool = True) -> dict[str, torch.Tensor]:
    """Feature correlations of the self, KNN and random pairs, as training samples them.

    Returns:
        ``{"self": (N1,), "knn": (N2,), "rand": (N3,)}`` float32 values (centred when
        ``pointwise``).
    """
    out: dict[str, list[torch.Tensor]] = {"self": [], "knn": [], "rand": []}
    post = centre_correlation if pointwise else (lambda t: t)
    for _ in range(n_batches):
        feats, pos = draw_pairs(maps, units, table, batch_size, window, gen)
        c1 = torch.rand(batch_size, feature_samples, feature_samples, 2, generator=gen) * 2 - 1
        c2 = torch.rand(batch_size, feature_samples, feature_samples, 2, generator=gen) * 2 - 1
        f1 = sample_points(feats, c1)
        neg = sample_points(feats[negative_permutation(batch_size, gen)], c2)
        out["self"].append(post(correlation(f1, f1)).flatten())
        out["knn"].append(post(correlation(f1, sample_points(pos, c2))).flatten())
        out["rand"].append(post(correlation(f1, neg)).flatten())
    return {k: torch.cat(v) for k, v in out.items()}


def shifts_from_correlations(corrs: dict[str, torch.Tensor], config: AutoShiftConfig = AutoShiftConfig()
                             ) -> tuple[float, float, float]:
    """``(self, knn, rand)`` shifts: the ``1 - attract`` quantile of each term's correlations."""
    def q(values: torch.Tensor, attract: float) -> float:
        values = values if values.numel() <= 1_000_000 else values[:: values.numel() // 1_000_000 + 1]
        return round(float(torch.quantile(values, 1.0 - attract)), 4)

    return (q(corrs["self"], config.self_attract), q(corrs["knn"], config.knn_attract),
            q(corrs["rand"], config.rand_attract))
