"""A diffusers AutoencoderKL (what Stable Diffusion's VAEs are) as an imgvae model."""

from __future__ import annotations

import torch
from torch import nn

from imgvae.config import ConfigError, ModelConfig
from imgvae.models.base import VAE, DiagonalGaussian, register


def autoencoder_kl_arguments(cfg: ModelConfig, out_channels: int = 3) -> dict:
    """diffusers.AutoencoderKL's constructor arguments for an autoencoder-kl model config."""
    levels = len(cfg.block_out_channels)
    return {
        "in_channels": 3, "out_channels": out_channels, "block_out_channels": tuple(cfg.block_out_channels),
        "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        "layers_per_block": cfg.layers_per_block, "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups, "mid_block_add_attention": cfg.mid_block_add_attention,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
    }


@register("autoencoder-kl")
class AutoencoderKL(VAE):
    """A diffusers AutoencoderKL (`self.net`, what Stable Diffusion's VAEs are) behind imgvae's
    interface: its encoder's Gaussian, its decoder. The learned scalar sigma is imgvae's own
    (`log_scale`); a per-pixel sigma adds 3 output channels to the decoder, dropped on export.
    Any image size that 2**(levels - 1) divides."""

    def __init__(self, cfg: ModelConfig, image_size: int, scale: str = "none"):
        super().__init__(scale)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size % factor:
            raise ConfigError(f"data.image_size: model 'autoencoder-kl' with {len(cfg.block_out_channels)} levels "
                              f"needs image_size divisible by {factor}, got {image_size}")
        undivided = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
        if undivided:
            raise ConfigError(f"model.norm_num_groups: {cfg.norm_num_groups} groups do not divide the channels "
                              f"{undivided} of model.block_out_channels")
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # here: importing diffusers takes seconds

        self.net = DiffusersAutoencoderKL(**autoencoder_kl_arguments(cfg, self.out_channels), sample_size=image_size)
        self.latent_shape = (cfg.latent_channels, image_size // factor, image_size // factor)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        posterior = self.net.encode(x).latent_dist  # its log-variance is clamped to [-30, 20], as LDM's
        return DiagonalGaussian(posterior.mean, posterior.logvar)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z).sample

    def last_layer(self) -> torch.Tensor:
        return self.net.decoder.conv_out.weight

    def encoder_modules(self) -> list[nn.Module]:
        return [m for m in (self.net.encoder, self.net.quant_conv) if m is not None]
