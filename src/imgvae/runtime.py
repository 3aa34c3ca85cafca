"""Where a command runs: the device it picks, which process of a torchrun job it is, the error a
run stops with, and one-line warnings. Training's processes and precision are train/'s
(processes.py, precision.py)."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch

from imgvae.errors import ImgvaeError


class RunError(ImgvaeError, RuntimeError):
    """A run that cannot start or go on (occupied output folder, bad resume, no device, ...)."""


@contextmanager
def one_line_warnings(category: type[Warning]):
    """While active, warnings of `category` print as one line, "imgvae: MESSAGE" (the command
    line's skipped files); others as Python prints them. Nothing changes on import."""
    previous = warnings.formatwarning

    def one_line(message, cat, filename, lineno, line=None) -> str:
        if issubclass(cat, category):
            return f"imgvae: {message}\n"
        return previous(message, cat, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


def pick_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for but CUDA is not available")
    return device


def process_rank() -> int:
    """This process's rank in a torchrun job (0 alone): the one place it is read from."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process."""
    return process_rank() == 0


