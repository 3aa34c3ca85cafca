"""Models people already have: diffusers AutoencoderKL folders (config.json +
diffusion_pytorch_model.safetensors, as the Stable Diffusion VAEs ship, or a pipeline folder
with a vae/ inside) read as imgvae models, and imgvae's autoencoder-kl models written as such
folders. Nothing is ever downloaded: folders are read with local_files_only."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from imgvae.config import Config, ConfigError, from_dict, model_config, to_dict
from imgvae.errors import ImgvaeError
from imgvae.io.checkpoint import refuse_non_finite
from imgvae.models.autoencoder_kl import (
    AutoencoderKL,
    as_autoencoder_kl,
    autoencoder_kl_arguments,
    autoencoder_kl_config,
    diffusers_blocks,
    mean_outputs,
)
from imgvae.models.base import VAE
from imgvae.models.registry import build_vae

CONFIG_FILE, CLASS_NAME = "config.json", "AutoencoderKL"
# imgvae's model keys that are diffusers AutoencoderKL arguments of the same name.
ARCHITECTURE_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                     "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")
# The folder's other config fields: kept from the folder a model starts from unless the config sets
# them, and written back on export (the latent scale a downstream model was trained against).
CARRIED_KEYS = ("scaling_factor", "shift_factor", "sample_size", "force_upcast", "latents_mean", "latents_std")


class FolderError(ImgvaeError, ValueError):
    """A diffusers folder that is missing, malformed or holds a model imgvae cannot use."""


def find_folder(path: str | Path) -> Path | None:
    """The diffusers model folder at `path` (or in its vae/ subfolder, as a pipeline keeps it),
    or None when neither holds a config.json."""
    path = Path(path)
    for candidate in (path, path / "vae"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def _diffusers_defaults() -> dict:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    parameters = inspect.signature(DiffusersAutoencoderKL.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def read_folder_config(folder: Path) -> dict:
    """The folder's config.json with diffusers' defaults filled in; refused, in one line, when it
    is not an AutoencoderKL of plain encoder / decoder blocks on RGB images."""
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise FolderError(f"{folder / CONFIG_FILE}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict) or raw.get("_class_name") != CLASS_NAME:
        found = raw.get("_class_name") if isinstance(raw, dict) else None
        raise FolderError(f"{folder}: a diffusers {found or 'unknown'} folder; imgvae reads {CLASS_NAME} folders")
    values = _diffusers_defaults() | {k: v for k, v in raw.items() if not k.startswith("_")}
    levels = len(values["block_out_channels"])
    expected = {"in_channels": 3, "out_channels": 3, "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    plain = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    odd = {k: plain[k] for k, v in expected.items() if plain[k] != v}
    if odd:
        raise FolderError(f"{folder}: an AutoencoderKL imgvae cannot take ({odd}); it reads RGB models of "
                          "DownEncoderBlock2D / UpDecoderBlock2D blocks with SiLU")
    return values


def folder_config(folder: Path, image_size: int | None = None) -> Config:
    """An imgvae Config for the folder's model: its architecture (model.name autoencoder-kl),
    images of image_size (default: the folder's sample_size), the decoder noise fixed at sigma 1
    (diffusers models have no learned one) and no held-out data (give --data)."""
    values = read_folder_config(folder)
    model = {"name": "autoencoder-kl", **{k: values[k] for k in ARCHITECTURE_KEYS + CARRIED_KEYS}}
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in model.items()}
    return from_dict({"model": model, "data": {"image_size": image_size or values["sample_size"], "eval": []}})


def with_folder_architecture(cfg: Config, folder: Path) -> Config:
    """cfg with the architecture of the diffusers folder it is initialised from (model.pretrained),
    and the folder's latent scale, sample size and other fields where cfg does not set them."""
    if cfg.model.name != "autoencoder-kl":
        raise ConfigError(f"model.pretrained: {folder} is a diffusers AutoencoderKL; set model.name=autoencoder-kl "
                          f"(not {cfg.model.name!r})")
    theirs, own = to_dict(folder_config(folder))["model"], to_dict(cfg)["model"]
    carried = {k: theirs[k] for k in CARRIED_KEYS if own[k] is None}
    return from_dict(to_dict(cfg) | {"model": own | {k: theirs[k] for k in ARCHITECTURE_KEYS} | carried})


def load_folder_network(folder: Path):
    """The folder's diffusers AutoencoderKL, in float32, read from disk only."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    try:
        # low_cpu_mem_usage=False: without accelerate, diffusers would say so in five lines on every load
        return DiffusersAutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False).float()
    except Exception as e:  # OSError for missing weights, ValueError / RuntimeError for broken ones
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FolderError(f"{folder}: not a readable diffusers {CLASS_NAME} folder ({first})") from None


def open_folder(path: str | Path, device, image_size: int | None = None) -> tuple[AutoencoderKL, Config]:
    """A diffusers AutoencoderKL folder -> (imgvae model in eval mode on device, its Config)."""
    folder = find_folder(path)
    if folder is None:
        raise FolderError(f"{path}: no {CONFIG_FILE}: not a diffusers model folder")
    cfg = folder_config(folder, image_size)
    with torch.device("meta"):  # the network comes from the folder; the wrapper needs no weights of its own
        model = build_vae(cfg)
    model.net = load_folder_network(folder)
    refuse_non_finite(model.net.state_dict(), folder)
    return model.to(device).eval(), cfg


def load_pretrained(model: AutoencoderKL, folder: Path) -> None:
    """Initialise an autoencoder-kl model with a diffusers folder's weights; a per-pixel sigma's
    extra decoder channels start at log-sigma 0."""
    weights = load_folder_network(folder).state_dict()
    own = model.net.state_dict()
    for key in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        if own[key].shape[0] != weights[key].shape[0]:  # 6 outputs: the mean's 3 from the folder, then zeros
            weights[key] = torch.cat([weights[key], torch.zeros_like(own[key][weights[key].shape[0]:])])
    try:
        model.net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise FolderError(f"{folder}: its weights do not fit this model ({str(e).splitlines()[0]})") from None


def diffusers_network(model: VAE, cfg: Config, scaling_factor: float, shift_factor: float | None):
    """A plain diffusers AutoencoderKL computing what `model` (autoencoder-kl or kl-f*) computes
    (its mean outputs), with the latent scaling a second-stage model uses, z = (sample -
    shift_factor) * scaling_factor, and the fields of the folder it started from (CARRIED_KEYS;
    sample_size: else the training size)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    architecture = model_config("autoencoder-kl", **autoencoder_kl_config(model, cfg.model))
    fields = {k: getattr(cfg.model, k, None) for k in ("force_upcast", "latents_mean", "latents_std")}
    net = DiffusersAutoencoderKL(**autoencoder_kl_arguments(architecture, 3),
                                 sample_size=getattr(cfg.model, "sample_size", None) or cfg.data.image_size,
                                 scaling_factor=scaling_factor, shift_factor=shift_factor,
                                 **{k: v for k, v in fields.items() if v is not None})
    net.load_state_dict(as_autoencoder_kl(model), strict=True)
    return net.eval()


def vq_model_network(model: VAE, cfg: Config, scaling_factor: float):
    """A plain diffusers VQModel computing what a vq-f* model computes (its mean outputs): the
    same encoder, an identity quant_conv, the codebook as its embedding (a cosine one's codes as unit
    vectors: the same codes, export_codebook), an identity post_quant_conv, the decoder (with identity
    layers, diffusers_blocks). Refused in one line when the model's quantiser has no codebook lookup in
    the latent's dimensions (vq_model_blocker)."""
    from diffusers import VQModel

    reason = model.vq_model_blocker()
    if reason:
        raise ConfigError(f"--format diffusers: diffusers' VQModel cannot hold model {cfg.model.name!r}: {reason}; "
                          "use --format safetensors")
    c, levels = model.latent_shape[0], len(model.widths)
    net = VQModel(block_out_channels=tuple(model.widths), down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=cfg.model.blocks,
                  latent_channels=c, num_vq_embeddings=model.codebook_size, vq_embed_dim=c,
                  norm_num_groups=model.encoder.conv_norm_out.num_groups, sample_size=cfg.data.image_size,
                  scaling_factor=scaling_factor)
    identity = torch.eye(c)[:, :, None, None]
    weights = mean_outputs(diffusers_blocks(model.encoder, model.decoder)) | {
        "quant_conv.weight": identity, "quant_conv.bias": torch.zeros(c),
        "post_quant_conv.weight": identity, "post_quant_conv.bias": torch.zeros(c),
        "quantize.embedding.weight": model.export_codebook()}
    net.load_state_dict(weights, strict=True)
    return net.eval()
