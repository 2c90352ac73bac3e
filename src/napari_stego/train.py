"""Fitting the STEGO head on cached feature maps.

The backbone never runs here: each step crops random windows (224 px equivalent) from the
cached maps, picks a KNN partner window for each, and minimises the correlation loss of the
head's codes (:mod:`napari_stego.loss`) with Adam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import Cancelled
from .head import SegmentationHead
from .knn import crop_window, knn_table, make_units, unit_descriptors
from .loss import LossConfig, stego_loss

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (reference values where the paper has them).

    ``window``: feature cells per side of a training window (``None``: 224 px / stride).
    """

    steps: int = 2000
    batch_size: int = 16
    lr: float = 5e-4
    code_dim: int = 70
    dropout: float = 0.1
    n_neighbors: int = 7
    crop_ratio: float = 0.5
    window: int | None = None
    amp: bool = True
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainResult:
    """The fitted head and the per-step total loss."""

    head: SegmentationHead
    losses: list[float]


def _batch(maps, units, picks, window, gen, device) -> torch.Tensor:
    crops = [crop_window(maps[units[i].image], units[i], window, gen) for i in picks]
    return torch.stack(crops).to(device, torch.float32)


def train_head(maps: Sequence[torch.Tensor], config: TrainConfig = TrainConfig(), *, stride: int = 8,
               device: torch.device | str = "cpu", seed: int = 0, progress: Progress | None = None,
               cancel=None) -> TrainResult:
    """Fit a :class:`SegmentationHead` on feature maps.

    Args:
        maps: cached features, one ``(D, h_i, w_i)`` tensor per image (any sizes).
        config: training settings.
        stride: the backbone's stride (sets the default window of 224 px).
        device: where the head and the loss run.
        seed: seeds window sampling, partners, loss sampling, dropout and head init; CPU runs
            are reproducible. The global torch RNG is restored afterwards.
        progress: called as ``progress("train", step, steps)``.
        cancel: anything with ``is_set()``; checked every step (raises :class:`Cancelled`).

    Returns:
        :class:`TrainResult`.
    """
    device = torch.device(device)
    window = config.window or max(224 // stride, 1)
    units = make_units([tuple(m.shape[-2:]) for m in maps], config.crop_ratio)
    table = knn_table(unit_descriptors(maps, units), config.n_neighbors)
    gen = torch.Generator().manual_seed(seed)
    devices = [device.index or 0] if device.type == "cuda" else []
    use_amp = config.amp and device.type == "cuda"
    losses: list[float] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        head = SegmentationHead(maps[0].shape[0], config.code_dim, config.dropout).to(device)
        head.train()
        opt = torch.optim.Adam(head.parameters(), lr=config.lr)
        n_units = len(units)
        for step in range(config.steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"training cancelled at step {step}")
            if n_units >= config.batch_size:
                picks = torch.randperm(n_units, generator=gen)[: config.batch_size]
            else:
                picks = torch.randint(n_units, (config.batch_size,), generator=gen)
            ranks = torch.randint(table.shape[1], (len(picks),), generator=gen)
            partners = table[picks, ranks]
            feats = _batch(maps, units, picks.tolist(), window, gen, device)
            feats_pos = _batch(maps, units, partners.tolist(), window, gen, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                code = head(feats)
                code_pos = head(feats_pos)
            # the reference also drops feature channels of the target signal
            teacher = F.dropout2d(feats, config.dropout, training=True)
            teacher_pos = F.dropout2d(feats_pos, config.dropout, training=True)
            loss = stego_loss(teacher, teacher_pos, code.float(), code_pos.float(), config.loss,
                              generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            losses.append(float(loss.total.detach()))
            if progress is not None:
                progress("train", step + 1, config.steps)
    head.eval()
    return TrainResult(head=head, losses=losses)
