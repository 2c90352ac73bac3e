"""Choosing the torch device: CUDA > MPS > CPU, or what the user names."""

from __future__ import annotations

import torch

from .errors import StegoError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` picks CUDA, then Apple MPS, then CPU; otherwise checks the name."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StegoError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StegoError(f"device {device!r} asked for, but no CUDA GPU is available: use 'cpu' or 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StegoError(f"device {device!r} asked for, but MPS is not available: use 'cpu' or 'auto'")
    return dev
