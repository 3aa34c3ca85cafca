"""Every value of a config section checked beyond its type: ranges that types cannot express,
an upper bound for every number (beyond it a value is a typo, or exhausts memory or time first),
and the few rules that tie keys together."""

from __future__ import annotations

import math
import re

from imgvae.config.sections import (
    PIL_MAX_MEGAPIXELS,
    AutoencoderKLConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    PriorConfig,
    QuantizedConfig,
    TrainConfig,
)
from imgvae.errors import ImgvaeError


class ConfigError(ImgvaeError, ValueError):
    """A config file, key or value that cannot be used."""


# Range checks that types alone cannot express: keys that must be > 0, and >= 0.
POSITIVE = {
    "DataConfig": ["image_size", "crop_size", "views_per_image", "eval_views_per_image", "max_file_mb",
                   "max_megapixels"],
    "model": ["latent_dim", "base_channels", "levels", "blocks", "latent_channels", "layers_per_block",
              "norm_num_groups", "scaling_factor", "sample_size", "codebook_size", "codebook_dim"],
    "TrainConfig": ["epochs", "batch_size", "lr", "log_every", "grad_accum", "max_bad_steps"],
    "EvalConfig": ["grid_size"],
    "PriorConfig": ["components", "width", "depth", "patch_size", "view_epochs", "epochs", "batch_size", "lr",
                    "steps"],
}
NON_NEGATIVE = {
    "DataConfig": ["eval_limit", "num_workers", "memory_cache_gb"],
    "LossConfig": ["beta", "kl_warmup", "free_bits", "perceptual", "adversarial", "adversarial_start"],
    "TrainConfig": ["weight_decay", "ckpt_every", "ckpt_every_steps", "grad_clip", "ema", "time_limit",
                    "divergence_factor"],
    "EvalConfig": ["batch_size", "limit", "generation_images"],
    "PriorConfig": ["images"],
}


MAX_CODES = 2**20  # a codebook's size (FSQ's: the product of its levels)
# Upper bounds of the numeric keys: beyond them a value is a typo, or exhausts memory or time first.
MAXIMUM = {
    "DataConfig": {"image_size": 4096, "crop_size": 2**16, "views_per_image": 10**5, "eval_views_per_image": 10**5,
                   "eval_limit": 10**12, "num_workers": 256, "memory_cache_gb": 2**20, "device_cache_gb": 2**20,
                   "max_file_mb": 2**20},
    "model": {"latent_dim": 2**16, "bn_momentum": 1, "base_channels": 4096, "levels": 12, "blocks": 64,
              "latent_channels": 1024, "layers_per_block": 64, "norm_num_groups": 1024, "scaling_factor": 1e6,
              "shift_factor": 1e6, "sample_size": 2**16, "codebook_size": MAX_CODES, "codebook_dim": 4096,
              "dead_code_threshold": 1e9, "commitment": 1e6, "diversity": 1e6, "usage_warning": 1},
    "LossConfig": {"beta": 1e6, "free_bits": 1e3, "perceptual": 1e6, "adversarial": 1e6, "adversarial_start": 10**12,
                   "discriminator_lr": 10},
    "TrainConfig": {"epochs": 10**6, "batch_size": 2**16, "lr": 10, "weight_decay": 10, "rmsprop_alpha": 1,
                    "eps": 1, "lr_gamma": 10, "seed": 2**31 - 1, "log_every": 10**9, "ckpt_every": 10**6,
                    "ckpt_every_steps": 10**12, "grad_accum": 4096, "grad_clip": 1e9, "max_bad_steps": 10**6,
                    "time_limit": 10**7},
    "EvalConfig": {"grid_size": 64, "iw_samples": 10**4, "batch_size": 2**16, "limit": 10**12, "seed": 2**31 - 1,
                   "generation_images": 10**5},
    "PriorConfig": {"images": 10**9, "components": 1000, "depth": 64, "patch_size": 64, "view_epochs": 1000,
                    "epochs": 10**6, "batch_size": 2**16, "lr": 10, "steps": 10**4},
}
ABOVE_ZERO = {"LossConfig": ["discriminator_lr"], "TrainConfig": ["eps", "lr_gamma"]}
NON_NEGATIVE_TOO = {"DataConfig": ["device_cache_gb"],
                    "model": ["bn_momentum", "dead_code_threshold", "commitment", "diversity", "usage_warning"],
                    "TrainConfig": ["seed", "rmsprop_alpha"], "EvalConfig": ["seed"]}
DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _bounds(cfg, prefix: str, section: str) -> None:
    """Every numeric key within its MAXIMUM; the few that must be > 0 or >= 0 besides POSITIVE and
    NON_NEGATIVE's."""
    for name in ABOVE_ZERO.get(section, []):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{prefix}{name} must be > 0, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE_TOO.get(section, []):
        value = getattr(cfg, name, None)
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{prefix}{name} must be >= 0, got {value}")
    for name, high in MAXIMUM.get(section, {}).items():
        value = getattr(cfg, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > high:
            raise ConfigError(f"{prefix}{name} must be <= {high:,}, got {value:,}")


def validate(cfg, prefix: str) -> None:
    """One section, built from its values, checked; ConfigError names the first bad key."""
    section = "model" if isinstance(cfg, ModelConfig) else type(cfg).__name__
    _bounds(cfg, prefix, section)
    for name in POSITIVE.get(section, []):
        value = getattr(cfg, name, None)
        if isinstance(value, (int, float)) and value <= 0:  # views may be "auto"
            raise ConfigError(f"{prefix}{name} must be > 0, got {value}")
    for name in NON_NEGATIVE.get(section, []):
        value = getattr(cfg, name)
        if isinstance(value, (int, float)) and value < 0:  # num_workers may be "auto"
            raise ConfigError(f"{prefix}{name} must be >= 0, got {value}")
    if isinstance(cfg, DataConfig):
        lo, hi = cfg.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{prefix}crop_scale must satisfy 0 < lo <= hi <= 1, got {cfg.crop_scale}")
        if not cfg.train:
            raise ConfigError(f"{prefix}train needs at least one source")
        if cfg.max_megapixels > PIL_MAX_MEGAPIXELS:
            raise ConfigError(f"{prefix}max_megapixels must be <= {PIL_MAX_MEGAPIXELS} (PIL's own limit), "
                              f"got {cfg.max_megapixels}")
    if isinstance(cfg, LossConfig) and cfg.kl_warmup > 1:
        raise ConfigError(f"{prefix}kl_warmup is a fraction of training, got {cfg.kl_warmup}")
    if isinstance(cfg, AutoencoderKLConfig) and (not cfg.block_out_channels or min(cfg.block_out_channels) <= 0):
        raise ConfigError(f"{prefix}block_out_channels needs at least one level, each > 0, "
                          f"got {cfg.block_out_channels}")
    if isinstance(cfg, (TrainConfig, PriorConfig)) and not 0 <= cfg.ema < 1:
        raise ConfigError(f"{prefix}ema is a decay in [0, 1), got {cfg.ema}")
    if isinstance(cfg, TrainConfig):
        _check_train(cfg, prefix)
    if isinstance(cfg, AutoencoderKLConfig) and (len(cfg.block_out_channels) > 12
                                                 or max(cfg.block_out_channels) > 8192):
        raise ConfigError(f"{prefix}block_out_channels: at most 12 levels of at most 8192 channels, "
                          f"got {cfg.block_out_channels}")
    if isinstance(cfg, QuantizedConfig):
        _check_quantizer(cfg, prefix)
    if isinstance(cfg, PriorConfig) and cfg.width not in ["auto"] + [2**i for i in range(3, 12)]:
        raise ConfigError(f"{prefix}width must be auto or a power of 2 from 8 to 2048, got {cfg.width}")
    if isinstance(cfg, EvalConfig) and cfg.iw_samples < 1:
        raise ConfigError(f"{prefix}iw_samples must be >= 1, got {cfg.iw_samples}")


def _check_quantizer(cfg: QuantizedConfig, prefix: str) -> None:  # decay, FSQ levels, LFQ's power of 2
    if not 0 < cfg.decay < 1:
        raise ConfigError(f"{prefix}decay is an EMA decay in (0, 1), got {cfg.decay}")
    lv = cfg.fsq_levels
    if cfg.quantizer == "fsq" and not (1 <= len(lv) <= 16 and 3 <= min(lv) and math.prod(lv) <= MAX_CODES):
        raise ConfigError(f"{prefix}fsq_levels: 1 to 16 channels of at least 3 levels each (2 levels a channel: "
                          f"quantizer 'lfq'), at most {MAX_CODES:,} codes in all, got {lv}")
    if cfg.quantizer == "lfq" and cfg.diversity:
        raise ConfigError(f"{prefix}diversity weighs a codebook's or a grid's entropy: quantizer 'vq' or 'fsq', "
                          "not 'lfq' (it has its own entropy loss): set model.diversity=0")
    if cfg.quantizer == "lfq" and (cfg.codebook_size < 2 or cfg.codebook_size & (cfg.codebook_size - 1)):
        raise ConfigError(f"{prefix}codebook_size: quantizer 'lfq' needs a power of 2, got {cfg.codebook_size}")


def _check_train(cfg: TrainConfig, prefix: str) -> None:
    if not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"{prefix}betas are decays in [0, 1), got {list(cfg.betas)}")
    if 0 < cfg.divergence_factor < 2:
        raise ConfigError(f"{prefix}divergence_factor is 0 (off) or a factor >= 2, got {cfg.divergence_factor}")
    if not DEVICE.match(cfg.device):
        raise ConfigError(f"{prefix}device: {cfg.device!r} is not auto, cpu, cuda, cuda:N, mps or xpu")
