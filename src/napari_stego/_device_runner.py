"""The backbone on a device, batch by batch: autocast, out-of-memory fallback, and features
copied back to the host without blocking (the engine of :func:`napari_stego.features.
extract_source`)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import StegoError

if TYPE_CHECKING:
    from .backbones import Backbone
    from .features import FeatureConfig


def _autocast(device: torch.device, config: FeatureConfig):
    dtype = getattr(torch, config.autocast) if config.autocast else torch.float32
    return torch.autocast(device.type, dtype=dtype,
                          enabled=device.type == "cuda" and config.autocast is not None)



def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


class _Pending:
    """Features on their way from the device to the host: ``result()`` waits for the copy
    (a CUDA event), so the caller can queue the next batch while this one is copied."""

    def __init__(self, host: torch.Tensor, event=None) -> None:
        self.host, self.event = host, event

    def result(self) -> np.ndarray:
        """``(B, D, h, w)`` float16."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


class _Runner:
    """Runs batches through the backbone, halving the batch on out-of-memory errors."""

    def __init__(self, backbone: Backbone, device: torch.device, config: FeatureConfig,
                 batch_size: int) -> None:
        self.backbone, self.device, self.config = backbone, device, config
        self.batch_size = batch_size
        self.calls = 0

    @property
    def host_dtype(self) -> torch.dtype:
        """Dtype of the tiles sent to the device: float16 under CUDA autocast (the backbone
        rounds its input to 16 bits anyway), halving host copies and transfers."""
        cuda16 = self.device.type == "cuda" and self.config.autocast is not None
        return torch.float16 if cuda16 else torch.float32

    @torch.inference_mode()
    def submit(self, x: torch.Tensor) -> _Pending:
        """Start ``(B, 3, H, W)`` tiles in [0, 1] (CPU, pinned for CUDA) through the backbone;
        the features come back into one pinned host buffer without blocking this thread."""
        host, i = None, 0
        cuda = self.device.type == "cuda"
        while i < x.shape[0]:
            n = min(self.batch_size, x.shape[0] - i)
            try:
                out = self._forward(x[i:i + n])
                if host is None:
                    host = torch.empty((x.shape[0], *out.shape[1:]), dtype=torch.float16,
                                       pin_memory=cuda)
                host[i:i + n].copy_(out, non_blocking=cuda)
                i += n
            except Exception as exc:  # OOM of any backend
                if not _is_oom(exc):
                    raise
                _free_device_memory(self.device)
                if n == 1:
                    raise StegoError(
                        f"the {self.device.type} device ran out of memory on a single tile of "
                        f"{tuple(x.shape[-2:])} pixels: use smaller tiles (TileConfig(tile=...)) "
                        "or device='cpu'; features computed so far are kept in the cache"
                    ) from None
                self.batch_size = max(1, n // 2)
                warnings.warn(f"{self.device.type} out of memory with {n} tiles per batch: "
                              f"continuing with {self.batch_size}", RuntimeWarning, stacklevel=2)
        event = None
        if cuda:  # on this device's stream: the current device may be another GPU
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return _Pending(host, event)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` host tiles -> ``(n, D, h, w)`` float16 on the device."""
        self.calls += 1
        dev = x.to(self.device, non_blocking=True).float()
        with _autocast(self.device, self.config):
            feats = self.backbone(self.backbone.normalize(dev))
        return feats.to(torch.float16)
