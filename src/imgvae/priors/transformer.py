"""Transformers over latent grids, of one block: diffusers' BasicTransformerBlock (the block of
its DiT, PixArt and Transformer2DModel). Two networks use it:

- PatchVelocity, the flow prior's DiT-style backbone for spatial latents (C, h, w): latent
  patches (diffusers' PatchEmbed, sin-cos positions) through blocks modulated by the time
  (PixArt's single adaptive LayerNorm: one time embedding, a learned table per block), back to
  patches of velocity;
- TokenTransformer, the token prior's bidirectional transformer over a grid of code indices
  (MaskGIT): code embeddings plus learned positions through plain LayerNorm blocks, to logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_DIM = 64  # channels per attention head (DiT's, PixArt's)


def time_features(t: torch.Tensor, dims: int) -> torch.Tensor:
    """Sinusoidal features (B, dims) of times t (B,) in [0, 1]."""
    half = dims // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


def transformer_blocks(width: int, depth: int, norm_type: str) -> nn.ModuleList:
    """`depth` diffusers BasicTransformerBlocks of `width` channels, heads of HEAD_DIM (at least
    one), GELU feed-forward of 4 x width; norm_type "ada_norm_single" (modulated by a time
    embedding passed as `timestep`) or "layer_norm"."""
    from diffusers.models.attention import BasicTransformerBlock  # here: importing diffusers takes seconds

    heads = max(1, width // HEAD_DIM)
    return nn.ModuleList(
        BasicTransformerBlock(width, heads, width // heads, activation_fn="gelu-approximate", attention_bias=True,
                              norm_type=norm_type, norm_elementwise_affine=norm_type == "layer_norm", norm_eps=1e-6)
        for _ in range(depth))


class PatchVelocity(nn.Module):
    """v(x, t) for spatial latents (B, C, h, w): patch x patch patches, `depth` blocks of `width`
    channels, the time through adaptive LayerNorm (its modulation starts at zero, so every block
    starts as the identity, as DiT's adaLN-Zero)."""

    def __init__(self, latent_shape: tuple[int, int, int], width: int, depth: int, patch: int):
        super().__init__()
        from diffusers.models.embeddings import PatchEmbed

        c, h, w = latent_shape
        self.width, self.patch, self.channels, self.cond_dim = width, patch, c, width
        self.embed = PatchEmbed(height=h, width=w, patch_size=patch, in_channels=c, embed_dim=width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # each block's 6 shift/scale/gate
        self.blocks = transformer_blocks(width, depth, "ada_norm_single")
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(width, patch * patch * c)
        for layer in (self.modulation[1], self.final_modulation[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for block in self.blocks:  # gates start closed: the identity
            nn.init.zeros_(block.scale_shift_table)

    def hidden_layers(self) -> list[tuple[nn.Module, int]]:
        """(block, its channels) of the hidden states alignment can take."""
        return [(block, self.width) for block in self.blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        emb = self.time(time_features(t, self.width).to(x.dtype))
        emb = emb if cond is None else emb + cond.to(emb.dtype)  # adaLN conditioning, as DiT's class labels
        modulation = self.modulation(emb)  # (B, 6 * width)
        tokens = self.embed(x)  # (B, h/p * w/p, width)
        for block in self.blocks:
            tokens = block(tokens, timestep=modulation)
        shift, scale = self.final_modulation(emb).chunk(2, dim=1)
        tokens = self.out(self.norm(tokens) * (1 + scale[:, None]) + shift[:, None])  # (B, n, p * p * C)
        p = self.patch
        patches = tokens.view(b, h // p, w // p, p, p, c)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class TokenTransformer(nn.Module):
    """Logits (B, h * w, codebook_size) of every position's code, from a grid of codes (B, h, w)
    in which some are the mask (index codebook_size): bidirectional attention over all positions."""

    def __init__(self, grid: tuple[int, int], codebook_size: int, width: int, depth: int):
        super().__init__()
        self.mask_index = codebook_size
        self.embed = nn.Embedding(codebook_size + 1, width)
        self.position = nn.Parameter(torch.randn(1, grid[0] * grid[1], width) * 0.02)
        self.blocks = transformer_blocks(width, depth, "layer_norm")
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, codebook_size)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """cond (B, width): a leading condition token (MaskGIT's class token), dropped from the output."""
        h = self.embed(tokens.flatten(1)) + self.position
        if cond is not None:
            h = torch.cat([cond.to(h.dtype)[:, None], h], 1)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h[:, 0 if cond is None else 1:]))
