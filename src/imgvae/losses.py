"""Pure loss and likelihood functions on model outputs.

Training losses return (loss, {"name": detached scalar tensor}); stats stay
tensors so a GPU step needs no host sync (callers call .item() when logging).
"""

from __future__ import annotations

import math

import torch

from .config import LossConfig
from .models import VAEOutput

# 8-bit pixels on the model's [-1, 1] scale: 256 levels, bins 2/255 wide.
PIXEL_LEVELS = 256


def gaussian_elbo(x: torch.Tensor, out: VAEOutput, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The seed's loss, averaged over the batch:
    0.5 * sum (x - x_hat)^2 over pixels and channels (a unit-variance Gaussian
    decoder up to its constant) + beta * KL(q(z|x) || N(0, I)) summed over latents.
    x, out.x_hat: (B, 3, S, S) on the [-1, 1] scale.
    """
    recon = 0.5 * (x - out.x_hat).pow(2).flatten(1).sum(1).mean()
    kl = out.posterior.kl().flatten(1).sum(1).mean()
    loss = recon + cfg.beta * kl
    return loss, {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}


def decoder_log_scale(cfg: LossConfig) -> float:
    """log sigma of the decoder's Gaussian on the [-1, 1] scale: the seed's
    0.5 * squared error is a unit-variance Gaussian."""
    return 0.0


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | float) -> torch.Tensor:
    """log P(x) per element of N(mean, sigma^2) integrated over the 8-bit bin of x.

    x holds 8-bit levels on [-1, 1] (k / 127.5 - 1); the bins are [x - 1/255,
    x + 1/255], the outermost ones open to -inf / +inf, so P sums to 1 over the
    256 levels. Computed in float64 on the lower tail (by symmetry), where
    log Phi is accurate, as log Phi(hi) + log(1 - Phi(lo) / Phi(hi)).
    """
    x, mean = x.double(), mean.double()
    log_scale = torch.as_tensor(log_scale, dtype=torch.float64, device=x.device)
    half = 1.0 / (PIXEL_LEVELS - 1)
    inv = torch.exp(-log_scale)
    lo = (x - half - mean) * inv
    hi = (x + half - mean) * inv
    lo = torch.where(x < -1 + half, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(x > 1 - half, torch.full_like(hi, math.inf), hi)
    upper = (x - mean) > 0  # mirror the upper tail onto the lower one
    lo, hi = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
    log_hi = torch.special.log_ndtr(hi)
    gap = (torch.special.log_ndtr(lo) - log_hi).clamp(max=-1e-30)
    return log_hi + torch.log(-torch.expm1(gap))


def bits_per_dim(nats_per_image: float | torch.Tensor, dims: int):
    """Negative log-likelihood in nats per image -> bits per dimension."""
    return nats_per_image / (dims * math.log(2))
