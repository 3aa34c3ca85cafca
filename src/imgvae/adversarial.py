"""The PatchGAN opponent of loss.adversarial (taming-transformers' recipe): a
discriminator with its own Adam, trained with the hinge loss on each batch and its
reconstructions from loss.adversarial_start on; the VAE gets -D(x_hat) at an
adaptive weight that balances its gradient against the reconstruction's."""

from __future__ import annotations

import torch

from .config import Config
from .losses import adaptive_gan_weight, hinge_discriminator_loss
from .models import PatchDiscriminator
from .runtime import autocast


class Adversary:
    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.discriminator = PatchDiscriminator().to(device)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.loss.discriminator_lr, betas=(0.5, 0.9))

    def active(self, step: int) -> bool:
        return step >= self.cfg.loss.adversarial_start

    def generator_term(self, loss: torch.Tensor, x_hat: torch.Tensor, last_layer: torch.Tensor):
        """-> (weighted generator loss to add to the VAE loss, stats)."""
        with autocast(x_hat.device, self.cfg.train.precision):
            generator_loss = -self.discriminator(x_hat).float().mean()
        weight = self.cfg.loss.adversarial * adaptive_gan_weight(loss, generator_loss, last_layer)
        return weight * generator_loss, {"generator": generator_loss.detach(), "gan_weight": weight}

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One hinge-loss step on a batch and its (detached) reconstructions; skipped
        when its gradients are not finite. -> the discriminator loss."""
        with autocast(real.device, self.cfg.train.precision):
            loss = hinge_discriminator_loss(self.discriminator(real).float(), self.discriminator(fake.detach()).float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if all(torch.isfinite(p.grad).all() for p in self.discriminator.parameters() if p.grad is not None):
            self.optimizer.step()
        return loss.detach()
