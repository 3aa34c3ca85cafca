"""VAE architectures behind a small registry.

Every model maps images (B, 3, S, S) in [-1, 1] to a posterior over latents
and back. No optimiser, device, precision or logging code lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import ModelConfig

MODELS: dict[str, Callable[[ModelConfig, int], "VAE"]] = {}


def register(name: str):
    def add(cls):
        MODELS[name] = cls
        return cls

    return add


def build_model(cfg: ModelConfig, image_size: int) -> "VAE":
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; available: {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, image_size)


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); tensors of shape (B, *latent_shape)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar

    def sample(self) -> torch.Tensor:
        # Reparametrisation: z = mu + sigma * eps keeps z differentiable in mu, sigma.
        return self.mean + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent element, same shape as mean."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


@dataclass
class VAEOutput:
    x_hat: torch.Tensor  # (B, 3, S, S) reconstruction in [-1, 1]
    posterior: DiagonalGaussian
    z: torch.Tensor  # the latent that was decoded


class VAE(nn.Module):
    """Interface shared by all registered models."""

    latent_shape: tuple[int, ...]

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        """sample=False decodes the posterior mean (deterministic reconstructions)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return VAEOutput(self.decode(z), posterior, z)


def _conv_bn_relu(cin: int, cout: int, momentum: float, transpose: bool = False) -> list[nn.Module]:
    if transpose:
        conv = nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1, bias=False)
    else:
        conv = nn.Conv2d(cin, cout, 5, stride=2, padding=2, bias=False)
    return [conv, nn.BatchNorm2d(cout, momentum=momentum), nn.ReLU(inplace=True)]


@register("seed")
class SeedVAE(VAE):
    """The original repository's VAE (../shared/seed/ARCHITECTURE.md), layer by layer.

    At 64x64 and latent 128: encoder 18,071,360 + decoder 4,693,155 parameters.
    The seed hard-wired 64x64; here the 8x8 bottleneck is image_size / 8.
    """

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"model 'seed' needs image_size divisible by 8, got {image_size}")
        m, d = cfg.bn_momentum, cfg.latent_dim
        self.bottleneck = (256, image_size // 8, image_size // 8)
        flat = 256 * (image_size // 8) ** 2
        self.latent_shape = (d,)
        self.encoder = nn.Sequential(
            *_conv_bn_relu(3, 64, m),
            *_conv_bn_relu(64, 128, m),
            *_conv_bn_relu(128, 256, m),
            nn.Flatten(),
            nn.Linear(flat, 1024, bias=False),
            nn.BatchNorm1d(1024, momentum=m),
            nn.ReLU(inplace=True),
        )
        self.to_mean = nn.Linear(1024, d)
        self.to_logvar = nn.Linear(1024, d)
        self.decoder_fc = nn.Sequential(
            nn.Linear(d, flat, bias=False), nn.BatchNorm1d(flat, momentum=m), nn.ReLU(inplace=True)
        )
        self.decoder = nn.Sequential(
            *_conv_bn_relu(256, 256, m, transpose=True),
            *_conv_bn_relu(256, 128, m, transpose=True),
            *_conv_bn_relu(128, 32, m, transpose=True),
            nn.Conv2d(32, 3, 5, stride=1, padding=2),
            nn.Tanh(),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.encoder(x)  # (B, 1024)
        return DiagonalGaussian(self.to_mean(h), self.to_logvar(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_fc(z).view(z.shape[0], *self.bottleneck)
        return self.decoder(h)
