"""Fitting the STEGO head on cached feature maps.

The backbone never runs here: each step draws random windows (224 px equivalent) of the
cached maps and a KNN partner window for each, reads the features at the loss's random points
of those windows, runs the head on just those points and minimises the correlation loss of the
codes (:mod:`napari_stego.loss`) with Adam.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .appearance import AppearanceConfig, AppearanceTeacher, appearance_weight, median_distance
from .errors import Cancelled
from .head import SegmentationHead, init_from_features
from .knn import (
    PackedMaps,
    Unit,
    descriptor_chunks,
    draw_pair_points,
    knn_table,
    make_units,
    pack_maps,
    sample_vectors,
    table_chunks,
    unit_descriptors,
)
from .loss import LossConfig, negative_permutation, points_loss, unit_norm
from .shifts import AutoShiftConfig, auto_shifts

Progress = Callable[[str, int, int], None]
_log = logging.getLogger(__name__)
# training reads the losses back to the host once every this many steps (each read waits for
# the device); ``on_loss`` then gets them all
LOSS_READ_EVERY = 10
# the largest float32 copy of the training maps a CPU fit makes for faster draws
CPU_FLOAT32_PACK_MB = 1024


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (reference values where the paper has them).

    ``window``: feature cells per side of a training window (``None``: 224 px / stride).
    ``auto_shifts``: measure the data's feature correlations before training and replace the
    shifts of ``loss`` (see :mod:`napari_stego.shifts`); ``None`` keeps ``loss`` as it is.
    ``init``: ``"pca"`` starts the head from the features' principal directions
    (:func:`~napari_stego.head.init_from_features`); ``"random"`` is PyTorch's default, as the
    reference.
    ``steps``: 500, the length measured on the four benchmark datasets (docs/benchmarks.md:
    1000 steps cost ISBI 6 points after the CRF; the paper trains longer).
    ``appearance``: how much of the correlation target comes from the cells' colours
    (:mod:`napari_stego.appearance`); used when the maps carry colour channels.
    ``ema_span``: keep, instead of the last weights, their exponential moving average over the
    steps (Polyak averaging, ``torch.optim.swa_utils``), whose time constant is this fraction
    of ``steps`` (decay ``1 - 1 / (ema_span * steps)``, :func:`ema_decay`; 0.2 of 500 steps:
    0.99); the average never feeds back into training, so the same seed trains the same
    weights either way. ``None``: the last weights (as the reference and before 0.2 was the
    default: docs/benchmarks.md, "The weights' moving average").
    """

    steps: int = 500
    batch_size: int = 16
    lr: float = 5e-4
    code_dim: int = 70
    dropout: float = 0.1
    n_neighbors: int = 7
    crop_ratio: float = 0.5
    window: int | None = None
    amp: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    auto_shifts: AutoShiftConfig | None = field(default_factory=AutoShiftConfig)
    init: str = "pca"
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    ema_span: float | None = 0.2


def ema_decay(config: TrainConfig) -> float:
    """The decay of the weights' moving average: its time constant is ``config.ema_span`` of
    the steps (at least one step: decay 0, the last weights)."""
    return 1.0 - 1.0 / max(1.0, config.ema_span * config.steps)


@dataclass
class TrainResult:
    """The fitted head, the per-step total loss, the loss settings actually used and how
    automatic shifts were chosen."""

    head: SegmentationHead
    losses: list[float]
    loss: LossConfig
    shift_report: dict = field(default_factory=dict)
    appearance_report: dict = field(default_factory=dict)


@dataclass
class _StepPoints:
    """The loss's sample points of one step, read from the cached maps before the head runs.

    ``anchor (B, D, S, 2S)``: each window at its own points (left half) and at the partners'
    points (right half, where it serves as a negative); ``partner (B, D, S, S)``: the KNN
    partners' windows. The head and the channel dropout then see each image once, as when the
    whole window goes through them, but on ``3 S^2`` instead of ``2 window^2`` cells. The head
    is 1x1 convolutions, so running it on sampled features instead of sampling its codes only
    changes where the bilinear interpolation sits.
    """

    anchor: torch.Tensor
    partner: torch.Tensor
    neg_perms: torch.Tensor  # (neg_samples, B)
    coords: tuple[torch.Tensor, torch.Tensor]  # (B, S, S, 2) each: batch points, partner points

    def loss(self, feats_a: torch.Tensor, feats_pos: torch.Tensor, code_a: torch.Tensor,
             code_pos: torch.Tensor, config: LossConfig):
        s = feats_pos.shape[-1]
        # normalised once: the negatives are rows of the same tensors
        feats_a, code_a, feats_pos, code_pos = map(unit_norm, (feats_a, code_a, feats_pos, code_pos))
        f1, g2 = feats_a[..., :s], feats_a[..., s:]
        c1, h2 = code_a[..., :s], code_a[..., s:]
        negatives = [(g2[perm], h2[perm]) for perm in self.neg_perms.to(feats_a.device)]
        return points_loss(f1, c1, feats_pos, code_pos, negatives, config, normalized=True)


def _sample_step(maps: Sequence[torch.Tensor] | PackedMaps, units: Sequence[Unit] | None,
                 table: torch.Tensor | None, batch_size: int, window: int, config: LossConfig,
                 gen: torch.Generator) -> _StepPoints:
    """Draw one step's windows, partners, points and negatives (see :func:`draw_pair_points`);
    with :class:`~napari_stego.knn.PackedMaps` and a generator of their device, all on that
    device."""
    pts = draw_pair_points(maps, units, table, batch_size, window, config.feature_samples, gen)
    perms = torch.stack([negative_permutation(batch_size, gen) for _ in range(config.neg_samples)])
    return _StepPoints(torch.cat([pts.anchor1, pts.anchor2], dim=-1), pts.partner, perms,
                       (pts.coords1, pts.coords2))


def train_head(maps: Sequence[torch.Tensor], config: TrainConfig = TrainConfig(), *, stride: int = 8,
               device: torch.device | str = "cpu", seed: int = 0, n_clusters: int | None = None,
               progress: Progress | None = None, cancel=None,
               on_loss: Callable[[int, float], None] | None = None,
               appearance_channels: int = 0) -> TrainResult:
    """Fit a :class:`SegmentationHead` on feature maps.

    Args:
        maps: cached features, one ``(D, h_i, w_i)`` tensor per image (any sizes).
        config: training settings.
        stride: the backbone's stride (sets the default window of 224 px).
        device: where the head and the loss run.
        n_clusters: the number of clusters the codes will be split into; automatic shifts use
            it to estimate how many pairs belong together (see :mod:`napari_stego.shifts`).
        seed: seeds window sampling, partners, loss sampling, dropout and head init; CPU runs
            are reproducible. The global torch RNG is restored afterwards.
        progress: called as ``progress("knn", done, total)`` from 0 to ``total`` while nearest
            neighbours are mined (a step per chunk of units and of table rows) and the
            appearance weight, the shifts (a step per measured batch) and the initial head
            are chosen, then
            ``progress("train", step, steps)`` after every step.
        cancel: anything with ``is_set()``; checked at every "knn" progress step and every
            training step (raises :class:`Cancelled`).
        on_loss: called as ``on_loss(step, total_loss)`` for every step, in bursts of
            :data:`LOSS_READ_EVERY` steps (for live display).
        appearance_channels: the last this many channels of every map are the cells' colours
            (:func:`~napari_stego.appearance.appearance_map`, 3 channels), not features: the
            head never sees them; ``config.appearance`` says how much of the target they make.

    The maps are packed once onto ``device`` (:func:`~napari_stego.knn.pack_maps`, float16 on
    a GPU); each step's windows, partners, points and negatives are drawn there by a generator
    of that device, and the loop reads nothing back to the host but the losses, every
    :data:`LOSS_READ_EVERY` steps.

    Returns:
        :class:`TrainResult`.
    """
    if config.ema_span is not None and not config.ema_span > 0:
        raise ValueError(f"TrainConfig.ema_span must be None or > 0, got {config.ema_span!r}")
    device = torch.device(device)
    window = config.window or max(224 // stride, 1)
    # "knn": mining nearest-neighbour windows (a step per chunk of units / table rows),
    # the appearance weight, the automatic shifts (a step per measured batch), the head's init
    units = make_units([tuple(m.shape[-2:]) for m in maps], config.crop_ratio)
    n_batches = config.auto_shifts.n_batches if config.auto_shifts is not None else 0
    tick = _Ticker(progress, "knn", len(descriptor_chunks(len(units)))
                   + len(table_chunks(len(units))) + bool(appearance_channels)
                   + (n_batches + 1 if config.auto_shifts is not None else 0) + 1, cancel)
    dim = maps[0].shape[0] - appearance_channels
    feats_only = [m[:dim] for m in maps] if appearance_channels else list(maps)
    table = knn_table(unit_descriptors(feats_only, units, on_chunk=tick), config.n_neighbors,
                      on_chunk=tick)
    gen = torch.Generator().manual_seed(seed)
    teacher, app_report = _appearance_teacher(maps, dim, appearance_channels, config,
                                              n_clusters, seed)
    if appearance_channels:
        tick()
    if teacher is None and appearance_channels:  # nothing to blend: train on features only
        maps = feats_only
    loss_config = config.loss
    report: dict = {}
    if config.auto_shifts is not None:
        (s_self, s_knn, s_rand), report = auto_shifts(
            maps, units, table, n_clusters=n_clusters, window=window, batch_size=config.batch_size,
            feature_samples=loss_config.feature_samples, pointwise=loss_config.pointwise,
            config=config.auto_shifts, seed=seed, transform=teacher, on_batch=tick)
        loss_config = replace(loss_config, self_shift=s_self, knn_shift=s_knn, rand_shift=s_rand)
        _log.info("automatic shifts self %.4f knn %.4f rand %.4f (attracted fractions %s; "
                  "the features' groups as regions: %s)", s_self, s_knn, s_rand,
                  report["attract"], report.get("regions", "not measured"))
        tick()
    devices = [device.index or 0] if device.type == "cuda" else []
    use_amp = config.amp and device.type == "cuda"
    losses: list[float] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        head = SegmentationHead(dim, config.code_dim, config.dropout)
        if config.init == "pca":
            init_from_features(head, sample_vectors(feats_only, 20_000, gen))
        elif config.init != "random":
            raise ValueError(f"TrainConfig.init must be 'pca' or 'random', got {config.init!r}")
        head = head.to(device)
        head.train()
        tick()
        opt = torch.optim.Adam(head.parameters(), lr=config.lr)
        averaged = (None if config.ema_span is None else
                    AveragedModel(head, multi_avg_fn=get_ema_multi_avg_fn(ema_decay(config))))
        packed = pack_maps(maps, units, table, device, _packed_dtype(maps, device))
        step_gen = torch.Generator(device=device).manual_seed(seed)
        step_losses = torch.zeros(config.steps, device=device)

        def read_losses(upto: int) -> None:  # one host read for the steps since the last
            start = len(losses)
            losses.extend(step_losses[start:upto].tolist())
            if on_loss is not None:
                for i in range(start, upto):
                    on_loss(i + 1, losses[i])

        for step in range(config.steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"training cancelled at step {step}")
            points = _sample_step(packed, None, None, config.batch_size, window, loss_config,
                                  step_gen)
            x_a, x_pos = points.anchor, points.partner
            f_a, f_pos = x_a[:, :dim], x_pos[:, :dim]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                code_a = head(f_a)
                code_pos = head(f_pos)
            # the reference also drops feature channels of the target signal
            teacher_a = F.dropout2d(f_a, config.dropout, training=True)
            teacher_pos = F.dropout2d(f_pos, config.dropout, training=True)
            if teacher is not None:
                teacher_a, teacher_pos = teacher(x_a, teacher_a), teacher(x_pos, teacher_pos)
            loss = points.loss(teacher_a, teacher_pos, code_a.float(), code_pos.float(), loss_config)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            if averaged is not None:
                averaged.update_parameters(head)
            step_losses[step] = loss.total.detach()
            if (step + 1) % LOSS_READ_EVERY == 0 or step + 1 == config.steps:
                read_losses(step + 1)
            if progress is not None:
                progress("train", step + 1, config.steps)
    if averaged is not None:
        head = averaged.module
    head.eval()
    return TrainResult(head=head, losses=losses, loss=loss_config, shift_report=report,
                       appearance_report=app_report)


class _Ticker:
    """``progress(stage, 0, total)`` now, then ``progress(stage, i, total)`` at the i-th call,
    after which a set ``cancel`` raises :class:`Cancelled`."""

    def __init__(self, progress: Progress | None, stage: str, total: int, cancel=None) -> None:
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0
        self.cancel = cancel
        if progress is not None:
            progress(stage, 0, total)

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.stage, min(self.done, self.total), self.total)
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"cancelled while preparing training ({self.done} of {self.total})")


def _packed_dtype(maps: Sequence[torch.Tensor], device: torch.device) -> torch.dtype:
    """float16 on a GPU (half the memory, gathers as fast); float32 on a CPU, where gathering
    float16 and converting it every step costs about 12 % of a step, unless the float32 copy
    would pass :data:`CPU_FLOAT32_PACK_MB` (then the maps' own dtype)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and sum(m.numel() for m in maps) * 4 <= CPU_FLOAT32_PACK_MB * 2**20:
        return torch.float32
    return maps[0].dtype


def _appearance_teacher(maps, dim: int, channels: int, config: TrainConfig,
                        n_clusters: int | None, seed: int):
    """The :class:`~napari_stego.appearance.AppearanceTeacher` of a fit (``None`` when the
    maps carry no colours or the weight is 0) and the report of the weight rule."""
    if not channels:
        return None, {}
    colours = [m[dim:].float() for m in maps]
    w, report = appearance_weight(colours, n_clusters, config.appearance, seed,
                                  features=[m[:dim] for m in maps])
    _log.info("appearance weight %.3f (%s)", w, report)
    if w <= 0:
        return None, report
    sigma = median_distance(colours, seed)
    report["sigma"] = round(sigma, 4)
    return AppearanceTeacher(dim, w, sigma, config.appearance.n_fourier, seed), report
