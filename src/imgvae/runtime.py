"""Where and how a run executes: device choice (and, with issue 7, processes and precision)."""

from __future__ import annotations

import torch


class RunError(RuntimeError):
    """A run that cannot start or go on (occupied output folder, bad resume, no device, ...)."""


def pick_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for but CUDA is not available")
    return device
