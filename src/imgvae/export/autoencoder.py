"""An autoencoder as a folder other tools read: --format diffusers writes a diffusers AutoencoderKL
folder for the KL models (autoencoder-kl, kl-f4, kl-f8) or a VQModel folder for a vq quantiser
(a codebook lookup in the latent's dimensions, Euclidean or cosine), with the latent scale kept
or measured; --format safetensors writes the weights and the imgvae config of any model (the
seed's flat 128-d latent fits no diffusers class)."""

from __future__ import annotations

import json
from pathlib import Path

from imgvae.config import Config, ConfigError, to_dict
from imgvae.io.checkpoint import save_weights
from imgvae.io.interop import diffusers_network, vq_model_network
from imgvae.io.paths import EXPORT_FORMAT
from imgvae.models.autoencoder_kl import AutoencoderKL, KLAutoencoder
from imgvae.models.base import VAE
from imgvae.models.quantized import QuantizedAutoencoder

FORMATS = ("diffusers", "safetensors")
NEAREST = {"fsq": "vq-f8 (model.quantizer=vq, a codebook lookup)", "lfq": "vq-f8 (model.quantizer=vq)"}


def export_format(model: VAE, cfg: Config, fmt: str | None) -> str:
    """The format to write the model as (default: diffusers where a diffusers class holds it, else
    safetensors); refused in one line, with the reason, when the model cannot go there."""
    if fmt not in (None, *FORMATS):
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    fits = isinstance(model, (AutoencoderKL, KLAutoencoder)) or (isinstance(model, QuantizedAutoencoder)
                                                                 and model.vq_model_blocker() is None)
    fmt = fmt or ("diffusers" if fits else "safetensors")
    if fmt == "diffusers" and isinstance(model, QuantizedAutoencoder) and not fits:
        nearest = NEAREST.get(model.kind, "vq-f4 or vq-f8 as the presets set them (model.codebook_dim: null)")
        raise ConfigError(f"--format diffusers: diffusers' VQModel cannot hold model {cfg.model.name!r}: "
                          f"{model.vq_model_blocker()}; the nearest that exports: {nearest}; or --format safetensors")
    if fmt == "diffusers" and not fits:
        latent = "x".join(map(str, model.latent_shape))
        raise ConfigError(f"--format diffusers takes the KL models (autoencoder-kl, kl-f4, kl-f8) and vq-f* with a "
                          f"plain codebook; no diffusers class fits model {cfg.model.name!r} (latent {latent}): use "
                          "--format safetensors")
    return fmt


def diffusers_autoencoder(model: VAE, cfg: Config, scale: dict):
    """The diffusers network (AutoencoderKL or VQModel) that computes what `model` does."""
    if isinstance(model, QuantizedAutoencoder):
        return vq_model_network(model, cfg, scale["scaling_factor"])
    return diffusers_network(model, cfg, scale["scaling_factor"], scale["shift_factor"])


def write_autoencoder(model: VAE, cfg: Config, folder: Path, fmt: str, stats: dict, scale: dict) -> None:
    """The autoencoder into `folder` as `fmt` (export_format)."""
    if fmt == "diffusers":
        diffusers_autoencoder(model, cfg, scale).save_pretrained(folder, safe_serialization=True)
        return
    folder.mkdir(parents=True)
    save_weights(model.state_dict(), folder / "model.safetensors")
    config = {"format": EXPORT_FORMAT, "version": 1, "config": to_dict(cfg), "latent_statistics": stats,
              "latent_scale": scale}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
