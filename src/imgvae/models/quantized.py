"""Discrete latents: kl-f*'s encoder and decoder (diffusers' blocks) around a quantiser from
vector-quantize-pytorch, so the latent is a grid of tokens, each one of a codebook's codes
(VQGAN, LDM's vq-f4 / vq-f8, FSQ, lookup-free quantisation)."""

from __future__ import annotations

import math

import torch
from torch import nn

from imgvae.config import ModelConfig
from imgvae.models.autoencoder_kl import kl_blocks
from imgvae.models.base import VAE, Quantized, register


def build_quantizer(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """model.quantizer's module over (B, latent_channels, h, w) maps -> (module, codebook size)."""
    from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize  # here: it imports einx and loguru

    c = cfg.latent_channels
    with torch.device("cpu"):  # FSQ and LFQ read their small tables on the host: not on the meta device
        if cfg.quantizer == "fsq":
            return FSQ(levels=list(cfg.fsq_levels), dim=c, channel_first=True), math.prod(cfg.fsq_levels)
        if cfg.quantizer == "lfq":
            return LFQ(dim=c, codebook_size=cfg.codebook_size, commitment_loss_weight=cfg.commitment,
                       channel_first=True), cfg.codebook_size
    # The EMA codebook is no parameter, so DDP does not average its updates: the quantiser all-reduces
    # its statistics itself (and samples k-means and dead-code restarts across processes) when told
    # so. Its own default asks a cached is_distributed(), which stays False for good if first asked
    # before the process group exists: the ranks' codebooks then drift apart (tests/test_tokens.py).
    sync = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    vq = VectorQuantize(dim=c, codebook_size=cfg.codebook_size, codebook_dim=cfg.codebook_dim, decay=cfg.decay,
                        kmeans_init=cfg.kmeans_init, use_cosine_sim=cfg.cosine,
                        threshold_ema_dead_code=cfg.dead_code_threshold, rotation_trick=cfg.rotation_trick,
                        commitment_weight=cfg.commitment, codebook_diversity_loss_weight=cfg.diversity,
                        accept_image_fmap=True, sync_codebook=sync)
    return vq, cfg.codebook_size


class QuantizedAutoencoder(VAE):
    """vq-f4 / vq-f8: tokens on a (S / f, S / f) grid, f = 2**downsamplings; the encoder gives
    latent_channels per position, the quantiser replaces them by a code, the decoder draws the
    image from the codes. Any image_size divisible by f."""

    discrete = True

    def __init__(self, cfg: ModelConfig, image_size: int, scale: str, downsamplings: int):
        super().__init__(scale)
        encoder, decoder, self.widths, side = kl_blocks(cfg, image_size, downsamplings, "vq", self.out_channels,
                                                        double_z=False)
        self.latent_shape, self.token_shape = (cfg.latent_channels, side, side), (side, side)
        self.kind, self.cosine, self.diversity = cfg.quantizer, cfg.cosine, cfg.diversity
        self.encoder = encoder
        self.quantizer, self.codebook_size = build_quantizer(cfg)
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> Quantized:
        h = self.encoder(x).float()  # codebooks and distances in float32
        with torch.autocast(h.device.type, enabled=False):
            if self.kind == "fsq":  # with model.diversity: minus the entropy of its grid's batch mean (weighted)
                (z, indices), aux, parts = self.quantizer(h), torch.zeros((), device=h.device), {}
                if self.diversity:
                    parts["diversity"] = -grid_entropy(self.quantizer, h)
                    aux = self.diversity * parts["diversity"]
            elif self.kind == "lfq":  # its entropy loss (weighted) and commitment
                (z, indices, aux), breakdown = self.quantizer(h, return_loss_breakdown=True)
                parts = {"entropy": aux - self.quantizer.commitment_loss_weight * breakdown.commitment,
                         "commitment": breakdown.commitment}
            else:  # the EMA updates the codebook: no codebook loss; the (weighted) commitment and diversity
                z, indices, aux, breakdown = self.quantizer(h, return_loss_breakdown=True)
                parts = {"commitment": breakdown.commitment}
                if self.quantizer.has_codebook_diversity_loss:  # minus the entropy, unweighted
                    parts["diversity"] = breakdown.codebook_diversity
        stats = {k: v.detach().reshape(()) for k, v in parts.items()}
        return Quantized(z, indices, self.codebook_size, aux.reshape(()), stats)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> the quantised latent (B, latent_channels, h, w) the decoder
        takes, as encode() gives it for those codes."""
        with torch.autocast(indices.device.type, enabled=False):
            if self.kind == "vq":  # not its get_output_from_indices: that projects a channel-first map
                codes = self.quantizer.get_codes_from_indices(indices.long())  # (B, codebook_dim, h, w)
                return self.quantizer.project_out(codes.movedim(1, -1)).movedim(-1, 1)
            return self.quantizer.indices_to_codes(indices.long())

    def vq_model_blocker(self) -> str | None:
        """Why diffusers' VQModel cannot compute what this model does (None: it can). Its
        quantiser is a nearest-code lookup in the latent's own dimensions: Euclidean, or cosine, which
        is the Euclidean lookup of unit codes (export_codebook)."""
        if self.kind != "vq":
            return f"its quantiser is {self.kind!r}, which has no codebook lookup (VQModel's only quantiser)"
        book = self.quantizer._codebook
        if book.embed.shape[-1] != self.latent_shape[0]:
            return "its codes are looked up in a lower dimension (model.codebook_dim); VQModel looks up in the latent's"
        return None

    def export_codebook(self) -> torch.Tensor:
        """The codebook (codebook_size, C) for a Euclidean lookup that picks this model's codes: its own,
        or with model.cosine its codes made unit vectors. The cosine quantiser takes the code e
        maximising <z / |z|, e / |e|>, which is the one minimising |z - e / |e||^2 = |z|^2 - 2 <z, e / |e|>
        + 1; and it hands the decoder that unit code."""
        book = self.quantizer._codebook.embed[0].detach().float()
        return torch.nn.functional.normalize(book, dim=-1) if self.cosine else book

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder, self.quantizer]


def grid_entropy(fsq: nn.Module, h: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """Entropy of the batch's mean soft code probabilities over FSQ's grid of codes, for
    (B, C, h, w) pre-quantisation maps: each channel's bounded value (the one FSQ rounds, by its
    own formula) soft-assigned to that channel's levels (softmax of minus the squared distance
    over temperature, levels one apart), the channels' assignments multiplied into one over the
    grid. Maximal (log of the grid's size) when the batch spreads evenly over every code."""
    levels = fsq._levels
    x = h.movedim(1, -1).reshape(-1, h.shape[1])
    half = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(x)
    bounded = torch.tanh(x + torch.atanh(offset / half)) * half - offset
    joint = x.new_ones(len(x), 1)
    for c, n in enumerate(levels.tolist()):
        grid = torch.arange(n, device=x.device, dtype=x.dtype) - n // 2
        p = torch.softmax(-(bounded[:, c:c + 1] - grid) ** 2 / temperature, dim=-1)
        joint = (joint.unsqueeze(-1) * p.unsqueeze(1)).flatten(1)
    mean = joint.mean(0)
    return -(mean * mean.clamp_min(1e-12).log()).sum()


register("vq-f4")(lambda cfg, image_size, scale="none": QuantizedAutoencoder(cfg, image_size, scale, 2))
register("vq-f8")(lambda cfg, image_size, scale="none": QuantizedAutoencoder(cfg, image_size, scale, 3))


def code_usage(counts: torch.Tensor) -> dict:
    """Codebook health from how often each code was used over a whole image set (not a batch):
    used / dead codes, usage (used / size) and perplexity (exp of the codes' entropy)."""
    counts = counts.double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"size": len(counts), "used": used, "dead": len(counts) - used, "usage": used / len(counts),
            "perplexity": float(entropy.exp())}
