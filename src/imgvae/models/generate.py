"""What an autoencoder draws: latents decoded, reconstructions, latent interpolations, as [0, 1]
image tensors on the CPU (the priors that give the latents are in priors/; writing files is the
verbs' job)."""

from __future__ import annotations

import torch

from imgvae.data.decode import denormalize
from imgvae.models.base import VAE, inference


def prior_noise(model: VAE, n: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """Fixed latents (n, *latent_shape) from N(0, T^2 I), drawn on the CPU so the same seed gives
    the same latents on any device."""
    generator = torch.Generator().manual_seed(seed)
    return temperature * torch.randn(n, *model.latent_shape, generator=generator)


def decode(model: VAE, z: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (n, 3, S, S), on the CPU."""
    with inference(model) as device:
        return denormalize(model.decode(z.to(device)).float()).cpu()


def decode_codes(model: VAE, codes: torch.Tensor) -> torch.Tensor:
    """A discrete model's code grids (n, h, w) -> images in [0, 1], (n, 3, S, S), on the CPU."""
    with inference(model) as device:
        return decode(model, model.codes(codes.to(device)))


def reconstruct(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Normalised images -> deterministic reconstructions (posterior mean) in [0, 1]."""
    with inference(model) as device:
        return denormalize(model(x.to(device), sample=False).x_hat.float()).cpu()


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents a, b (same shape) at fractions t (K,)
    -> (K, *a.shape); falls back to linear when a and b are (anti)parallel."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm()).clamp(min=1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    t = t.double().view(-1, *([1] * a.dim()))
    if torch.sin(omega).abs() < 1e-6:
        return lerp(a, b, t.flatten())
    out = (torch.sin((1 - t) * omega) * a.double() + torch.sin(t * omega) * b.double()) / torch.sin(omega)
    return out.to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation at fractions t (K,) -> (K, *a.shape)."""
    t = t.to(a.dtype).view(-1, *([1] * a.dim()))
    return (1 - t) * a + t * b


def interpolate(model: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Decode `steps` points from the posterior mean of x_a to that of x_b (normalised
    (3, S, S) images), linearly and spherically -> {"linear", "spherical"}: [0, 1] (steps, 3, S, S)."""
    with inference(model) as device:
        z = model.encode(torch.stack([x_a, x_b]).to(device)).mode().float().cpu()
    t = torch.linspace(0, 1, steps)
    return {"linear": decode(model, lerp(z[0], z[1], t)), "spherical": decode(model, slerp(z[0], z[1], t))}
