"""The PatchGAN opponent of loss.adversarial (taming-transformers' recipe): a
discriminator with its own Adam, trained with the hinge loss on each batch and its
reconstructions from loss.adversarial_start on; the VAE gets -D(x_hat) at an
adaptive weight that balances its gradient against the reconstruction's.

Like the VAE, the discriminator takes one optimiser step per training step: its
gradients are accumulated over the step's micro-batches and, under torchrun,
averaged over processes before the step. The adaptive weight is computed per
micro-batch and process from local gradients, as in taming-transformers under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.func import functional_call

from imgvae.config import LossConfig
from imgvae.models.discriminator import PatchDiscriminator
from imgvae.models.losses import adaptive_gan_weight, hinge_discriminator_loss
from imgvae.train.optim import step_if
from imgvae.train.precision import autocast


class Adversary:
    def __init__(self, cfg: LossConfig, precision: str, device: torch.device, world_size: int = 1):
        self.cfg, self.precision, self.world_size = cfg, precision, world_size
        discriminator = PatchDiscriminator().to(device)
        if world_size > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        self.discriminator = discriminator
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.discriminator_lr, betas=(0.5, 0.9),
                                          fused=True)  # skips a non-finite step on the device

    def state_dict(self) -> dict:
        """Its part of a checkpoint's state (its weights go in their own file, discriminator.safetensors)."""
        return {"d_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["d_optimizer"])

    def active(self, step: int) -> bool:
        return step >= self.cfg.adversarial_start

    def generator_term(self, loss: torch.Tensor, x_hat: torch.Tensor, last_layer: torch.Tensor):
        """-> (weighted generator loss to add to the VAE loss, stats)."""
        # Detached weights: the VAE's loss must not leave gradients in the discriminator.
        weights = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        with autocast(x_hat.device, self.precision):
            generator_loss = -functional_call(self.discriminator, weights, (x_hat,)).float().mean()
        weight = self.cfg.adversarial * adaptive_gan_weight(loss, generator_loss, last_layer)
        return weight * generator_loss, {"generator": generator_loss.detach(), "gan_weight": weight}

    def accumulate(self, real: torch.Tensor, fake: torch.Tensor, share: float) -> torch.Tensor:
        """Add share x the hinge-loss gradient of a micro-batch and its (detached)
        reconstructions. -> the discriminator loss."""
        with autocast(real.device, self.precision):
            loss = hinge_discriminator_loss(self.discriminator(real).float(), self.discriminator(fake.detach()).float())
        (loss * share).backward()
        return loss.detach()

    def step(self) -> None:
        """The optimiser step over the accumulated gradients, averaged over processes
        (every process calls this); skipped when they are not finite."""
        params = list(self.discriminator.parameters())
        if self.world_size > 1:
            for p in params:
                if p.grad is None:  # a process whose micro-batches were all too small
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            step_if(self.optimizer, torch.stack([torch.isfinite(g).all() for g in grads]).all())
        self.optimizer.zero_grad(set_to_none=True)
