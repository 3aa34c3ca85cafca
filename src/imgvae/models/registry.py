"""Building the model a config names, from the registry (models/base.py) that the architecture
modules fill; an unknown name or an image size a model cannot take is refused in one line."""

from __future__ import annotations

import torch

from imgvae.config import Config, ConfigError, LossConfig, ModelConfig
from imgvae.models import autoencoder_kl, conv, quantized  # noqa: F401  (they register their architectures)
from imgvae.models.base import MODELS, VAE


def build_model(cfg: ModelConfig, image_size: int, scale: str = "none") -> "VAE":
    """The registered model cfg.name for square images of image_size; scale: see SCALES."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; available: {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, image_size, scale)


def decoder_scale(cfg: LossConfig) -> str:
    """The decoder output (SCALES) that the loss's likelihood needs."""
    if cfg.likelihood == "logistic":
        return "pixel"
    if cfg.likelihood == "gaussian":
        return {"fixed": "none", "scalar": "scalar", "pixel": "pixel"}[cfg.sigma]
    return "none"


def build_vae(cfg: Config) -> "VAE":
    """The model a run config describes: its architecture, image size and the decoder
    output its loss needs."""
    return build_model(cfg.model, cfg.data.image_size, decoder_scale(cfg.loss))


def check_model(cfg: Config) -> "VAE":
    """Refuse a model the config cannot build (an unknown name, an image size its downsampling
    does not divide) before any data is read -> the model on the meta device (no memory, no
    weights), to ask its latent's shape and kind."""
    with torch.device("meta"):
        return build_vae(cfg)
