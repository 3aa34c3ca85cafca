"""The model section of a run's config, one class per architecture (model.name picks it): what
every model has, then each architecture's own keys; a key the chosen model does not use is refused."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from imgvae.config.fields import ConfigError, key, like

MAX_CODES = 2**20  # a codebook's size (FSQ's: the product of its levels)


@dataclass(frozen=True)
class ModelConfig:
    """What every model section has."""

    name: str = key("seed", help="architecture from the registry: seed, resnet, kl-f4, kl-f8, autoencoder-kl, "
                    "vq-f4, vq-f8")
    pretrained: str | None = key(None, help="initial weights: a local diffusers AutoencoderKL folder (its "
                                 "architecture then sets the autoencoder-kl keys) or an imgvae checkpoint of the same "
                                 "model; never downloaded")

    def check(self) -> None:
        """The rules that tie a section's keys together (ConfigError naming the key, without its section)."""


@dataclass(frozen=True)
class SeedConfig(ModelConfig):
    latent_dim: int = key(128, gt=0, le=2**16, help="size of the flat latent")
    bn_momentum: float = key(0.1, ge=0, le=1, help="BatchNorm momentum: PyTorch's default (the seed's 0.9 was a "
                             "Lasagne-convention porting bug)")


@dataclass(frozen=True)
class ResNetConfig(ModelConfig):
    name: str = like(ModelConfig, "name", "resnet")
    latent_dim: int = key(128, gt=0, le=2**16, help="size of the flat latent")
    base_channels: int = key(64, gt=0, le=4096, help="channels of the first level (x2, x4 deeper)")
    levels: int = key(3, gt=0, le=12, help="downsamplings (image_size a multiple of 2**levels)")
    blocks: int = key(1, gt=0, le=64, help="residual blocks per level")


@dataclass(frozen=True)
class KLConfig(ModelConfig):
    """kl-f4 / kl-f8: latent-diffusion's autoencoder of diffusers' blocks, 2 or 3 downsamplings."""

    name: str = like(ModelConfig, "name", "kl-f4")
    base_channels: int = key(64, gt=0, le=4096, help="channels of the first level (x2, x4 deeper)")
    blocks: int = key(1, gt=0, le=64, help="residual blocks per level")
    latent_channels: int = key(4, gt=0, le=1024, help="channels of the spatial latent")


@dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """A diffusers AutoencoderKL, with diffusers' own keys."""

    name: str = like(ModelConfig, "name", "autoencoder-kl")
    block_out_channels: list[int] = key(factory=lambda: [32, 64, 128, 128], help="channels per level (len - 1 "
                                        "downsamplings: [128, 256, 512, 512] is Stable Diffusion's f8)")
    layers_per_block: int = key(1, gt=0, le=64, help="ResNet layers per level")
    latent_channels: int = key(4, gt=0, le=1024, help="channels of the latent")
    norm_num_groups: int = key(32, gt=0, le=1024, help="GroupNorm groups (they must divide every level's channels)")
    mid_block_add_attention: bool = key(True, help="the attention mid block")
    use_quant_conv: bool = key(True, help="the 1x1 convolution after the encoder")
    use_post_quant_conv: bool = key(True, help="the 1x1 convolution before the decoder")
    scaling_factor: float | None = key(None, gt=0, le=1e6, help="the latent scale a second-stage model expects, "
                                       "z = (sample - shift_factor) * scaling_factor (null: none of its own; export "
                                       "measures it). Set from a diffusers folder it starts from")
    shift_factor: float | None = key(None, ge=-1e6, le=1e6, help="see scaling_factor")
    sample_size: int | None = key(None, gt=0, le=2**16, help="the size tiling starts at (null: the training size)")
    force_upcast: bool | None = key(None, help="a diffusers folder's field, kept on export: upcast to float32 in "
                                    "pipelines")
    latents_mean: list[float] | None = key(None, help="a diffusers folder's per-channel latent mean, kept on export")
    latents_std: list[float] | None = key(None, help="a diffusers folder's per-channel latent std, kept on export")

    def check(self) -> None:
        levels = self.block_out_channels
        if not levels or min(levels) <= 0:
            raise ConfigError(f"block_out_channels needs at least one level, each > 0, got {levels}")
        if len(levels) > 12 or max(levels) > 8192:
            raise ConfigError(f"block_out_channels: at most 12 levels of at most 8192 channels, got {levels}")


@dataclass(frozen=True)
class QuantizedConfig(ModelConfig):
    """vq-f4 / vq-f8: kl-f*'s encoder and decoder around a discrete latent, a grid of tokens
    (S / f, S / f), each one of codebook_size codes (vector-quantize-pytorch's quantisers)."""

    name: str = like(ModelConfig, "name", "vq-f8")
    base_channels: int = key(64, gt=0, le=4096, help="channels of the first level (x2, x4 deeper)")
    blocks: int = key(1, gt=0, le=64, help="residual blocks per level")
    latent_channels: int = key(8, gt=0, le=1024, help="channels the encoder gives the quantiser per position")
    quantizer: Literal["vq", "fsq", "lfq"] = key("vq", help="vq: an EMA codebook of codebook_size vectors; fsq: "
                                                 "each of len(fsq_levels) channels rounded to one of fsq_levels[i] "
                                                 "values; lfq: lookup-free, log2(codebook_size) signs per token")
    codebook_size: int = key(1024, gt=0, le=MAX_CODES, help="codes in the codebook (vq, lfq)")
    codebook_dim: int | None = key(None, gt=0, le=4096, help="dimension codes are looked up in (null: "
                                   "latent_channels)")
    cosine: bool = key(True, help="vq: compare codes by cosine similarity (l2-normalised codes)")
    kmeans_init: bool = key(True, help="vq: k-means initialise the codebook on the first batch")
    decay: float = key(0.95, gt=0, lt=1, help="vq: EMA decay of the codebook")
    dead_code_threshold: float = key(0.5, ge=0, le=1e9, help="vq: codes whose EMA count falls below this are "
                                     "restarted from the batch (0.5, not 2: at 2 the presets' codebooks went out of "
                                     "use at the same PSNR)")
    rotation_trick: bool = key(True, help="vq: gradients through the rotation trick")
    commitment: float = key(0.25, ge=0, le=1e6, help="weight of the commitment loss ||z - sg(code)||^2")
    diversity: float = key(0.0, ge=0, le=1e6, help="weight of minus the entropy of the batch's mean code "
                           "probabilities (vq: the codebook's; fsq: its grid's); lfq has its own entropy loss")
    fsq_levels: list[int] = key(factory=lambda: [8, 5, 5, 5], help="fsq: levels per channel (each >= 3)")
    usage_warning: float = key(0.5, ge=0, le=1, help="warn when fewer than this share of the codes are used on the "
                               "held-out images")

    def check(self) -> None:
        lv = self.fsq_levels
        if self.quantizer == "fsq" and not (1 <= len(lv) <= 16 and 3 <= min(lv) and math.prod(lv) <= MAX_CODES):
            raise ConfigError(f"fsq_levels: 1 to 16 channels of at least 3 levels each (2 levels a channel: "
                              f"quantizer 'lfq'), at most {MAX_CODES:,} codes in all, got {lv}")
        if self.quantizer == "lfq" and self.diversity:
            raise ConfigError("diversity weighs a codebook's or a grid's entropy: quantizer 'vq' or 'fsq', not 'lfq' "
                              "(it has its own entropy loss): set model.diversity=0")
        if self.quantizer == "lfq" and (self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1)):
            raise ConfigError(f"codebook_size: quantizer 'lfq' needs a power of 2, got {self.codebook_size}")


# model.name -> its section. The architecture modules register a model under each name (a test checks
# that the two lists agree).
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    "seed": SeedConfig, "resnet": ResNetConfig, "kl-f4": KLConfig, "kl-f8": KLConfig,
    "autoencoder-kl": AutoencoderKLConfig, "vq-f4": QuantizedConfig, "vq-f8": QuantizedConfig,
}


def model_config(name: str = "seed", **keys) -> ModelConfig:
    """The model section of architecture `name` with these keys (the others at their defaults)."""
    if name not in MODEL_CONFIGS:
        return ModelConfig(name=name)  # models.build_model names the ones there are
    return MODEL_CONFIGS[name](name=name, **keys)
