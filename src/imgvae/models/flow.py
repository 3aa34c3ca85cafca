"""A learned prior in an autoencoder's latent space: a small denoiser trained with the
flow-matching (rectified-flow) objective. Noise x0 ~ N(0, I) and a normalised latent x1 are
joined by the straight path x_t = (1 - t) x0 + t x1; the network predicts its velocity
x1 - x0. Sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (a latent) with Euler
or Heun steps, then undoes the normalisation; the autoencoder's decoder draws the image.

Spatial latents (C, h, w) get a DiT-style transformer over latent patches (models/transformer.py)
or diffusers' UNet2DModel (time embedding, ResNet and attention blocks); flat latents (D,) a
residual MLP with a sinusoidal time embedding.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from imgvae.config import ConfigError, PriorConfig
from imgvae.models.transformer import PatchVelocity, time_features

SOLVERS = ("euler", "heun")


SPATIAL = ("transformer", "unet")
# The attention kernel of the spatial backbones on a CPU (None: PyTorch's own choice, its flash
# kernel); bench/prior_speed.py sets both in turn.
CPU_ATTENTION: SDPBackend | None = SDPBackend.MATH

# prior.width / prior.depth "auto", per backbone: bench/RESULTS.md "Generation" chose them.
DEFAULT_SIZE = {"transformer": (256, 6), "unet": (64, 2), "mlp": (512, 4)}


def backbone_of(cfg: PriorConfig, latent_shape: tuple[int, ...]) -> str:
    """prior.backbone for this latent: "auto" is the UNet for spatial latents (it scored best at
    equal CPU time, bench/RESULTS.md "Generation"), the MLP for flat ones; a spatial backbone over
    a flat latent is refused, and a patch that does not divide the latent grid."""
    spatial = len(latent_shape) == 3
    if cfg.backbone == "auto":
        backbone = "unet" if spatial else "mlp"
    elif cfg.backbone in SPATIAL and not spatial:
        raise ConfigError(f"prior.backbone: {cfg.backbone} needs a spatial latent (C, h, w); this model's latent is "
                          f"{tuple(latent_shape)}: use prior.backbone=mlp (or auto)")
    else:
        backbone = cfg.backbone
    if backbone == "transformer" and any(side % cfg.patch_size for side in latent_shape[1:]):
        raise ConfigError(f"prior.patch_size: {cfg.patch_size} does not divide this model's latent grid "
                          f"{tuple(latent_shape[1:])}")
    return backbone


def size_of(cfg: PriorConfig, backbone: str) -> tuple[int, int]:
    """(width, depth) of the backbone: prior.width / prior.depth, or the backbone's defaults for "auto"."""
    width, depth = DEFAULT_SIZE[backbone]
    return (width if cfg.width == "auto" else cfg.width), (depth if cfg.depth == "auto" else cfg.depth)


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.time = nn.LayerNorm(width), nn.Linear(width, 2 * width)
        self.net = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time(emb).chunk(2, dim=1)
        return h + self.net(self.norm(h) * (1 + scale) + shift)


class MLPVelocity(nn.Module):
    """v(x, t) for flat latents (B, D): `depth` residual blocks of `width`, modulated by t."""

    def __init__(self, dims: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.inp, self.blocks = nn.Linear(dims, width), nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dims))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(time_features(t, self.width))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


class UNetVelocity(nn.Module):
    """v(x, t) for spatial latents (B, C, h, w): diffusers' UNet2DModel, `depth` levels of
    `width`, 2 * width, ... channels, attention at the coarser levels."""

    def __init__(self, latent_shape: tuple[int, int, int], width: int, depth: int):
        super().__init__()
        from diffusers import UNet2DModel  # here: importing diffusers takes seconds

        c, h, _ = latent_shape
        levels = max(1, min(depth, int(math.log2(h)) - 1))  # down to 4 x 4 at the coarsest
        widths = tuple(width * 2 ** min(i, 2) for i in range(levels))
        self.net = UNet2DModel(
            sample_size=h, in_channels=c, out_channels=c, block_out_channels=widths, layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
            up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            norm_num_groups=min(32, width // 4), attention_head_dim=min(32, width))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, 1000 * t).sample


class FlowPrior(nn.Module):
    """The velocity network of one autoencoder's latents, with their normalisation: latents
    are (z - mean) / std per channel while the flow sees them (buffers, saved with the weights)."""

    def __init__(self, cfg: PriorConfig, latent_shape: tuple[int, ...]):
        super().__init__()
        self.latent_shape, self.backbone = tuple(latent_shape), backbone_of(cfg, latent_shape)
        channels = latent_shape[0]
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        width, depth = size_of(cfg, self.backbone)
        if self.backbone == "transformer":
            self.velocity = PatchVelocity(self.latent_shape, width, depth, cfg.patch_size)
        elif self.backbone == "unet":
            self.velocity = UNetVelocity(self.latent_shape, width, depth)
        else:
            self.velocity = MLPVelocity(math.prod(latent_shape), width, depth)

    def _channels(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (len(self.latent_shape) - 1)))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._channels(self.mean)) / self._channels(self.std)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._channels(self.std) + self._channels(self.mean)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity at normalised points x (B, *latent_shape), times t (B,). On a CPU, attention
        over the few latent positions takes the plain matmul kernel: PyTorch's flash kernel has a
        slow backward there in bf16, and is no faster in fp32 (bench/prior_speed.py)."""
        if self.backbone == "mlp":
            return self.velocity(x.flatten(1), t).view_as(x)
        on_cpu = x.device.type == "cpu" and CPU_ATTENTION is not None
        with sdpa_kernel(CPU_ATTENTION) if on_cpu else nullcontext():
            return self.velocity(x, t)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int, solver: str = "heun") -> torch.Tensor:
        """Integrate the flow from noise (n, *latent_shape) at t = 0 to t = 1 in `steps` steps
        -> latents on the autoencoder's own scale, same device as the noise."""
        if solver not in SOLVERS:
            raise ConfigError(f"solver {solver!r} is not one of {list(SOLVERS)}")
        if steps < 1:
            raise ConfigError(f"the ODE needs at least 1 step, got {steps}")
        x, dt = noise.float(), 1.0 / steps
        for i in range(steps):
            t = torch.full((len(x),), i * dt, device=x.device)
            v = self(x, t).float()
            if solver == "heun" and i + 1 < steps:  # the last step stays Euler: v at t = 1 is not trained on
                v = 0.5 * (v + self(x + dt * v, t + dt).float())
            x = x + dt * v
        return self.denormalise(x)


def flow_loss(prior: FlowPrior, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The rectified-flow objective for latents z (B, *latent_shape) on the autoencoder's scale:
    mean squared error between the predicted and the straight path's velocity."""
    x1 = prior.normalise(z)
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    xt = (1 - tt) * noise + tt * x1
    return (prior(xt, t).float() - (x1 - noise)).pow(2).mean()


def draw_times(n: int, sampling: str, generator: torch.Generator, device) -> torch.Tensor:
    """Training times t (n,): logit-normal (SD3's, most weight mid-path) or uniform on [0, 1]."""
    if sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(torch.randn(n, generator=generator, device=device))
