"""What a model draws: prior samples, reconstructions, latent interpolations, as [0, 1]
image tensors on the CPU (writing them to files is the verbs' job)."""

from __future__ import annotations

import torch

from imgvae.config import ConfigError
from imgvae.data.decode import denormalize
from imgvae.models.base import VAE, inference
from imgvae.models.prior import LatentPrior


def prior_noise(model: VAE, n: int, seed: int, temperature: float = 1.0,
                prior: LatentPrior | None = None) -> torch.Tensor:
    """Fixed latents (n, *latent_shape) from N(0, T^2 I), or from a fitted prior at
    temperature T; drawn on the CPU so the same seed gives the same latents on any device."""
    generator = torch.Generator().manual_seed(seed)
    noise = temperature * torch.randn(n, *model.latent_shape, generator=generator)
    return noise if prior is None else prior.transform(noise, generator)


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


def sample(model: VAE, n: int, seed: int, temperature: float = 1.0, prior: LatentPrior | None = None) -> torch.Tensor:
    """n images from the prior (N(0, T^2 I), or a fitted one; a discrete model's own, codes
    uniform over its codebook), [0, 1], (n, 3, S, S); same seed, same images."""
    if not temperature > 0:
        raise ConfigError(f"the temperature must be > 0, got {temperature}")
    if hasattr(model, "token_shape"):
        generator = torch.Generator().manual_seed(seed)
        return decode_codes(model, torch.randint(model.codebook_size, (n, *model.token_shape), generator=generator))
    return decode(model, prior_noise(model, n, seed, temperature, prior))


def sample_flow(model: VAE, prior, n: int, seed: int, steps: int, solver: str = "heun", temperature: float = 1.0,
                batch_size: int = 64) -> torch.Tensor:
    """n images from a flow prior (models.flow.FlowPrior on the model's device): noise drawn on the
    CPU from `seed` (the same images on any device), scaled by T, carried to latents by the ODE
    in `steps` steps, decoded. -> [0, 1] (n, 3, S, S)."""
    if not temperature > 0:
        raise ConfigError(f"the temperature must be > 0, got {temperature}")
    noise = temperature * torch.randn(n, *model.latent_shape, generator=torch.Generator().manual_seed(seed))
    with inference(model) as device:
        images = [decode(model, prior.sample(chunk.to(device), steps, solver)) for chunk in noise.split(batch_size)]
    return torch.cat(images)


def sample_tokens(model: VAE, prior, n: int, seed: int, steps: int, temperature: float = 1.0) -> torch.Tensor:
    """n images from a token prior (models.tokens.TokenPrior on the model's device): code grids
    decoded in `steps` iterations at softmax temperature T, every random number drawn on the CPU
    from `seed` (the same images on any device), then decoded. -> [0, 1] (n, 3, S, S)."""
    if not temperature > 0:
        raise ConfigError(f"the temperature must be > 0, got {temperature}")
    device = next(prior.parameters()).device
    codes = prior.sample(n, steps, torch.Generator().manual_seed(seed), device, temperature)
    return decode_codes(model, codes)


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
