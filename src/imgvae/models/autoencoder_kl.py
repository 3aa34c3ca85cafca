"""latent-diffusion's KL autoencoder, one implementation: diffusers' encoder and decoder blocks.
autoencoder-kl is diffusers' AutoencoderKL itself (what Stable Diffusion's VAEs are); kl-f4 /
kl-f8 are the same blocks with one ResNet layer fewer per decoder level (cheaper on a CPU),
written to an AutoencoderKL folder exactly by as_autoencoder_kl."""

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

    def encoder_last_layer(self) -> torch.Tensor:
        return (self.net.quant_conv or self.net.encoder.conv_out).weight

    def encoder_modules(self) -> list[nn.Module]:
        return [m for m in (self.net.encoder, self.net.quant_conv) if m is not None]


def kl_groups(cfg: ModelConfig) -> int:
    """GroupNorm groups of a kl-f* model, one count for every level as diffusers' blocks take it:
    4 channels per group at the first level (imgvae 0.1's rule there), at most 32. bench/RESULTS.md
    has what 32 groups and 0.1's per-level counts did."""
    return min(32, cfg.base_channels // 4) or 1


def kl_blocks(cfg: ModelConfig, image_size: int, downsamplings: int, family: str, out_channels: int,
              double_z: bool) -> tuple[nn.Module, nn.Module, list[int], int]:
    """kl-f* / vq-f* blocks: diffusers' Encoder (model.blocks ResNet layers per level) and Decoder
    (as many), channels base * (1, 2, 4, 4), kl_groups groups; refused in one line when
    2**downsamplings does not divide image_size. -> (encoder, decoder, widths, latent side)."""
    factor = 2**downsamplings
    if image_size % factor:
        raise ConfigError(f"data.image_size: model '{family}-f{factor}' needs image_size divisible by {factor}, "
                          f"got {image_size}")
    from diffusers.models.autoencoders.vae import Decoder, Encoder  # here: importing diffusers takes seconds

    widths = [cfg.base_channels * m for m in (1, 2, 4, 4, 4)[: downsamplings + 1]]
    c, levels = cfg.latent_channels, downsamplings + 1
    common = {"block_out_channels": tuple(widths), "norm_num_groups": kl_groups(cfg)}
    encoder = Encoder(in_channels=3, out_channels=c, down_block_types=("DownEncoderBlock2D",) * levels,
                      layers_per_block=cfg.blocks, double_z=double_z, **common)
    decoder = Decoder(in_channels=c, out_channels=out_channels, layers_per_block=cfg.blocks - 1,
                      up_block_types=("UpDecoderBlock2D",) * levels, **common)
    return encoder, decoder, widths, image_size // factor


class KLAutoencoder(VAE):
    """kl-f4 / kl-f8: z is (latent_channels, S / f, S / f), f = 2**downsamplings; diffusers'
    Encoder (model.blocks ResNet layers per level) and Decoder (as many: diffusers' own
    AutoencoderKL has one more), an attention mid block, channels base * (1, 2, 4, 4), no 1x1
    convolutions around the latent. Any image_size divisible by f."""

    def __init__(self, cfg: ModelConfig, image_size: int, scale: str, downsamplings: int):
        super().__init__(scale)
        self.encoder, self.decoder, self.widths, side = kl_blocks(cfg, image_size, downsamplings, "kl",
                                                                  self.out_channels, double_z=True)
        self.latent_shape = (cfg.latent_channels, side, side)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, c, S/f, S/f) each
        # LDM's clamp: keeps exp(logvar) finite early in training.
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


register("kl-f4")(lambda cfg, image_size, scale="none": KLAutoencoder(cfg, image_size, scale, 2))
register("kl-f8")(lambda cfg, image_size, scale="none": KLAutoencoder(cfg, image_size, scale, 3))


def autoencoder_kl_config(model: VAE, cfg: ModelConfig) -> dict:
    """The autoencoder-kl model keys (AutoencoderKLConfig) of the diffusers AutoencoderKL that
    computes what `model` (autoencoder-kl or kl-f*) computes."""
    if isinstance(model, AutoencoderKL):
        return {k: getattr(cfg, k) for k in ("block_out_channels", "layers_per_block", "latent_channels",
                                             "norm_num_groups", "mid_block_add_attention", "use_quant_conv",
                                             "use_post_quant_conv")}
    return {"block_out_channels": list(model.widths), "layers_per_block": cfg.blocks,
            "latent_channels": cfg.latent_channels, "norm_num_groups": kl_groups(cfg),
            "mid_block_add_attention": True, "use_quant_conv": False, "use_post_quant_conv": False}


def diffusers_blocks(encoder: nn.Module, decoder: nn.Module) -> dict:
    """The encoder.* / decoder.* weights of a diffusers model with `layers_per_block` layers per
    level for a kl-f* / vq-f* encoder and decoder (a decoder level of diffusers' has one more):
    each level's missing last ResNet layer is an identity, its second convolution zero, so the
    layer returns its input and the diffusers model computes exactly what ours does."""
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    weights |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    for i, block in enumerate(decoder.up_blocks):
        spare, width = f"decoder.up_blocks.{i}.resnets.{len(block.resnets)}", block.resnets[-1].conv2.out_channels
        for norm in ("norm1", "norm2"):
            weights |= {f"{spare}.{norm}.weight": torch.ones(width), f"{spare}.{norm}.bias": torch.zeros(width)}
        for conv in ("conv1", "conv2"):
            weights |= {f"{spare}.{conv}.weight": torch.zeros(width, width, 3, 3),
                        f"{spare}.{conv}.bias": torch.zeros(width)}
    return weights


def mean_outputs(weights: dict) -> dict:
    """The decoder's mean outputs only: a per-pixel sigma's 3 extra channels dropped."""
    return {k: v[:3] if k.startswith("decoder.conv_out.") else v for k, v in weights.items()}


def as_autoencoder_kl(model: VAE) -> dict:
    """The state dict of the AutoencoderKL autoencoder_kl_config describes (mean outputs only)."""
    if isinstance(model, AutoencoderKL):
        return mean_outputs(dict(model.net.state_dict()))
    return mean_outputs(diffusers_blocks(model.encoder, model.decoder))
