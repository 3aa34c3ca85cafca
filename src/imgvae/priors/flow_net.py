"""The velocity networks of the flow prior: diffusers' UNet2DModel or a DiT-style transformer over
latent patches (priors/transformer.py) for spatial latents (C, h, w), a residual MLP with a
sinusoidal time embedding for flat ones (D,); which one a latent gets, and its size."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend

from imgvae.config import ConfigError, FlowConfig
from imgvae.priors.transformer import PatchVelocity, time_features

SPATIAL = ("transformer", "unet")
# The attention kernel of the spatial backbones on a CPU (None: PyTorch's own choice, its flash
# kernel); bench/prior_speed.py sets both in turn.
CPU_ATTENTION: SDPBackend | None = SDPBackend.MATH

# prior.width / prior.depth "auto", per backbone: bench/RESULTS.md "Generation" chose them.
DEFAULT_SIZE = {"transformer": (256, 6), "unet": (64, 2), "mlp": (512, 4)}


def backbone_of(cfg: FlowConfig, latent_shape: tuple[int, ...]) -> str:
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


def size_of(cfg: FlowConfig, backbone: str) -> tuple[int, int]:
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
        self.width = self.cond_dim = width
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.inp, self.blocks = nn.Linear(dims, width), nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dims))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(time_features(t, self.width))
        emb = emb if cond is None else emb + cond.to(emb.dtype)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


class UNetVelocity(nn.Module):
    """v(x, t) for spatial latents (B, C, h, w): diffusers' UNet2DModel, `depth` levels of
    `width`, 2 * width, ... channels, attention at the coarser levels; conditional: a condition
    vector added to its time embedding (diffusers' class_embed_type "identity")."""

    def __init__(self, latent_shape: tuple[int, int, int], width: int, depth: int, conditional: bool = False):
        super().__init__()
        from diffusers import UNet2DModel  # here: importing diffusers takes seconds

        c, h, _ = latent_shape
        levels = max(1, min(depth, int(math.log2(h)) - 1))  # down to 4 x 4 at the coarsest
        widths = tuple(width * 2 ** min(i, 2) for i in range(levels))
        self.net = UNet2DModel(
            sample_size=h, in_channels=c, out_channels=c, block_out_channels=widths, layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
            up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            norm_num_groups=min(32, width // 4), attention_head_dim=min(32, width),
            class_embed_type="identity" if conditional else None)
        self.cond_dim = 4 * width  # UNet2DModel's time embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, 1000 * t, class_labels=cond).sample

    def hidden_layers(self) -> list[tuple[nn.Module, int]]:
        """(layer, its channels) of the hidden states alignment can take: the down blocks, the mid block."""
        widths = self.net.config.block_out_channels
        return [(block, widths[i]) for i, block in enumerate(self.net.down_blocks)] + [(self.net.mid_block,
                                                                                     widths[-1])]


def hidden_layer_count(cfg: FlowConfig, latent_shape: tuple[int, ...]) -> int:
    """How many hidden layers of this backbone prior.align_layer can name (0 for the flat MLP)."""
    backbone = backbone_of(cfg, latent_shape)
    width, depth = size_of(cfg, backbone)
    if backbone == "unet":
        return max(1, min(depth, int(math.log2(latent_shape[1])) - 1)) + 1  # its levels, then the mid block
    return depth if backbone == "transformer" else 0


def hidden_map(output, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """A hidden layer's output as a map (B, C, h, w): a UNet block's first output, a transformer
    block's tokens (B, h * w, C) laid out on their grid `shape`."""
    h = output[0] if isinstance(output, tuple) else output
    return h if h.dim() == 4 else h.transpose(1, 2).reshape(len(h), h.shape[-1], *shape)


def velocity_network(cfg: FlowConfig, latent_shape: tuple[int, ...], conditional: bool = False
                     ) -> tuple[str, nn.Module]:
    """(backbone, its network) of the flow prior of this latent; the network's cond_dim is the size
    of the condition vector it adds to its time embedding."""
    backbone = backbone_of(cfg, latent_shape)
    width, depth = size_of(cfg, backbone)
    if backbone == "transformer":
        return backbone, PatchVelocity(tuple(latent_shape), width, depth, cfg.patch_size)
    if backbone == "unet":
        return backbone, UNetVelocity(tuple(latent_shape), width, depth, conditional)
    return backbone, MLPVelocity(math.prod(latent_shape), width, depth)
