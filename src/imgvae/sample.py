"""Decoding from the prior and writing picture grids."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from .data import denormalize
from .models import VAE


def prior_noise(model: VAE, n: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """Fixed z ~ N(0, T^2 I) of shape (n, *latent_shape), drawn on the CPU so the
    same seed gives the same noise on any device."""
    generator = torch.Generator().manual_seed(seed)
    return temperature * torch.randn(n, *model.latent_shape, generator=generator)


@contextmanager
def _inference(model: VAE):
    """Eval mode (BatchNorm running stats, no autograd), restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def decode(model: VAE, z: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (n, 3, S, S), on the CPU."""
    with _inference(model) as device:
        return denormalize(model.decode(z.to(device)).float()).cpu()


def reconstruct(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Normalised images -> deterministic reconstructions (posterior mean) in [0, 1]."""
    with _inference(model) as device:
        return denormalize(model(x.to(device), sample=False).x_hat.float()).cpu()


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """[0, 1] images (n, 3, S, S) -> one (3, H, W) grid image."""
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images: torch.Tensor, nrow: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid(images, nrow), path)
