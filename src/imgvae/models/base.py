"""The interface every model has: images (B, 3, S, S) in [-1, 1] to a posterior over latents
(DiagonalGaussian) and back (VAEOutput), and the registry of architectures. No optimiser,
device, precision or logging code lives in models/.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from imgvae.config import ModelConfig

# Filled by @register in models/conv.py and models/autoencoder_kl.py.
MODELS: dict[str, Callable[[ModelConfig, int, str], "VAE"]] = {}
# What the decoder says about pixel noise besides its mean: nothing ("none": the loss
# fixes it), one learned log-scale ("scalar"), or a log-scale per subpixel ("pixel",
# 3 more output channels).
SCALES = ("none", "scalar", "pixel")
# Learned log-scales are clamped: below -7 one 8-bit bin holds all the mass (PixelCNN++'s bound).
LOG_SCALE_RANGE = (-7.0, 3.0)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def register(name: str):
    def add(cls):
        MODELS[name] = cls
        return cls

    return add


@contextmanager
def inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode (BatchNorm running stats, no autograd) -> the model's device; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per element, in float64."""
    return -0.5 * z.double().pow(2) - LOG_SQRT_2PI


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); tensors of shape (B, *latent_shape)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + sigma * eps (reparametrisation: differentiable in mu, sigma);
        eps ~ N(0, I) drawn here unless given (same shape as mean)."""
        eps = torch.randn_like(self.mean) if noise is None else noise.to(self.mean)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent element, same shape as mean."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) per element, in float64 (the squared standardised distance in z's dtype)."""
        distance = ((z - self.mean).pow(2) / self.logvar.exp()).double()
        return -0.5 * distance - 0.5 * self.logvar.double() - LOG_SQRT_2PI

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) per element under the model's prior, N(0, I), in float64."""
        return standard_normal_log_prob(z)

    def float(self) -> "DiagonalGaussian":
        return DiagonalGaussian(self.mean.float(), self.logvar.float())


class Quantized:
    """A discrete latent as a posterior: q(z|x) puts all its mass on the codes z (B, C, h, w),
    indices (B, h, w), under a uniform prior over codebook_size codes per token, so the KL is
    the rate, log codebook_size per token (spread over its C channels here). aux_loss: the
    quantiser's training loss (commitment, entropy), stats: its parts, detached."""

    def __init__(self, z: torch.Tensor, indices: torch.Tensor, codebook_size: int, aux_loss: torch.Tensor,
                 stats: dict[str, torch.Tensor]):
        self.mean, self.indices, self.codebook_size = z, indices, codebook_size
        self.aux_loss, self.stats = aux_loss, stats

    @property
    def logvar(self) -> torch.Tensor:
        return torch.full_like(self.mean, -30.0)  # no spread (LDM's clamp floor: exp stays finite)

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """The rate per latent element: log codebook_size per token over its channels."""
        return torch.full_like(self.mean, math.log(self.codebook_size) / self.mean.shape[1])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z, dtype=torch.float64)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -self.kl().double()

    def float(self) -> "Quantized":
        return Quantized(self.mean.float(), self.indices, self.codebook_size, self.aux_loss.float(), self.stats)


@dataclass
class VAEOutput:
    x_hat: torch.Tensor  # (B, 3, S, S) decoder mean on the [-1, 1] scale
    posterior: "DiagonalGaussian | Quantized"
    z: torch.Tensor  # the latent that was decoded
    log_scale: torch.Tensor | None = None  # (B, 3, S, S) decoder log-scale, if the model has one

    def float(self) -> "VAEOutput":
        """fp32 copy of every field, for a loss computed outside autocast."""
        log_scale = None if self.log_scale is None else self.log_scale.float()
        return VAEOutput(self.x_hat.float(), self.posterior.float(), self.z.float(), log_scale)


class VAE(nn.Module):
    """Interface shared by all registered models: subclasses define `encode` and
    `decoder_output` (B, out_channels, S, S), out_channels = 6 with scale "pixel"."""

    latent_shape: tuple[int, ...]
    discrete = False  # a grid of codes (models/quantized.py: codes(), token_shape, codebook_size), not N(mu, sigma)

    def __init__(self, scale: str = "none"):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unknown decoder scale {scale!r}; available: {list(SCALES)}")
        self.scale = scale
        self.out_channels = 6 if scale == "pixel" else 3
        # sigma-VAE's single learned noise level: the optimiser tunes it with the weights.
        self.log_scale = nn.Parameter(torch.zeros(())) if scale == "scalar" else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        raise NotImplementedError

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_distribution(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents -> (decoder mean (B, 3, S, S), log-scale (B, 3, S, S) clamped to
        LOG_SCALE_RANGE, or None when the decoder has no scale)."""
        h = self.decoder_output(z)
        mean = h[:, :3]
        if self.scale == "pixel":
            return mean, h[:, 3:].clamp(*LOG_SCALE_RANGE)
        if self.scale == "scalar":
            return mean, self.log_scale.expand_as(mean).clamp(*LOG_SCALE_RANGE)
        return mean, None

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight (the adversarial loss balances its gradients)."""
        return self.decoder[-1].weight

    def encoder_last_layer(self) -> torch.Tensor:
        """The weight of the encoder's last layer (VA-VAE's adaptive weight balances its gradients)."""
        return self.encoder.conv_out.weight

    def encoder_modules(self) -> list[nn.Module]:
        """Everything between the image and the posterior (train.freeze_encoder holds them still)."""
        return [getattr(self, name) for name in ("encoder", "to_mean", "to_logvar", "to_stats") if hasattr(self, name)]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape) -> decoder mean (B, 3, S, S)."""
        return self.decode_distribution(z)[0]

    def forward(self, x: torch.Tensor, sample: bool = True, noise: torch.Tensor | None = None) -> VAEOutput:
        """sample=False decodes the posterior mean (deterministic reconstructions);
        noise: the eps of the reparametrisation, (B, *latent_shape), else drawn."""
        posterior = self.encode(x)
        z = posterior.sample(noise) if sample else posterior.mode()
        mean, log_scale = self.decode_distribution(z)
        return VAEOutput(mean, posterior, z, log_scale)
