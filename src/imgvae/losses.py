"""Pure loss functions: (loss, {"name": detached scalar tensor}) from model outputs.

Stats stay tensors so a GPU step needs no host sync; callers call .item() when logging.
"""

from __future__ import annotations

import torch

from .config import LossConfig
from .models import VAEOutput


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
