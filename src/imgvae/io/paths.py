"""What a model path is, answered once, and opening it: an imgvae run folder, a checkpoint
folder (or a run's checkpoints/), a folder `imgvae export` wrote, a diffusers AutoencoderKL
folder, or a diffusers pipeline folder holding one in vae/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from imgvae import rundir
from imgvae.config import Config, ConfigError, merge_overrides, with_overrides
from imgvae.io.checkpoint import (
    WEIGHTS,
    CheckpointError,
    _load_safetensors,
    _read_state,
    _read_whole,
    config_of,
    load_weights,
    resolve_checkpoint,
)
from imgvae.io.interop import find_folder, folder_config, load_pretrained, open_folder, with_folder_architecture
from imgvae.models.prior import PRIOR_FILE, LatentPrior
from imgvae.models.registry import build_vae

EXPORT_FORMAT = "imgvae-model"  # config.json of a folder `imgvae export --format safetensors` wrote
# What can change for a trained model: how images are read and how it is looked at.
OVERRIDABLE = ("data", "eval", "prior")


@dataclass(frozen=True)
class ModelPath:
    """kind: "checkpoint" (a checkpoint, checkpoints/ or run folder: `folder` is the checkpoint
    `last` points to, followed once), "export" or "diffusers" (`folder` holds its config.json)."""

    kind: str
    folder: Path


def identify(path: str | Path) -> ModelPath:
    """What the model path is; CheckpointError (one line) when it is none of them."""
    try:
        return ModelPath("checkpoint", resolve_checkpoint(path))
    except CheckpointError:
        folder = find_folder(path)
        if folder is None:
            raise
    return ModelPath("export" if is_export(folder) else "diffusers", folder)


def is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def open_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
               overrides: list[str] | dict | None = None):
    """Any model path (see identify) -> (model in eval mode on device, its Config with the
    overrides, the folder read); with the EMA weights when the run kept them (and ema is true).
    Overrides may change the data, eval and prior keys, data.image_size too for a model whose
    weights fit that size (the convolutional ones)."""
    where = identify(path)
    if where.kind == "export":
        cfg = config_of(json.loads((where.folder / "config.json").read_text()), where.folder)
        model, cfg = _model_with(cfg, overrides, _load_safetensors(where.folder / WEIGHTS, device), where.folder)
        return model.to(device).eval(), cfg, where.folder
    if where.kind == "diffusers":
        size = merge_overrides(overrides).get("data", {}).get("image_size")
        model, cfg = open_folder(where.folder, device, size)
        return model, with_use_overrides(cfg, overrides), where.folder

    def read(folder: Path):
        cfg = config_of(_read_state(folder, device), folder)
        averaged = folder / "ema.safetensors"
        weights = _load_safetensors(averaged if ema and averaged.is_file() else folder / WEIGHTS, device)
        model, cfg = _model_with(cfg, overrides, weights, folder)
        return model.to(device).eval(), cfg, folder

    return _read_whole(path, read)


def load_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = True):
    """A model path -> (model in eval mode on device, its Config); see open_model."""
    model, cfg, _ = open_model(path, device, ema)
    return model, cfg


def model_source(path: str | Path) -> tuple[str, int]:
    """What a model path is (its kind) and the image size its model was made for, from its
    config alone (no weights read)."""
    where = identify(path)
    if where.kind == "checkpoint":
        return where.kind, config_of(_read_state(where.folder, "cpu"), Path(path)).data.image_size
    if where.kind == "export":
        return where.kind, config_of(json.loads((where.folder / "config.json").read_text()),
                                     where.folder).data.image_size
    return where.kind, folder_config(where.folder).data.image_size


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder a model path belongs to (RUN/checkpoints/NAME), if any."""
    try:
        run = resolve_checkpoint(path).parent.parent
    except CheckpointError:  # an export or a diffusers folder: no run
        return None
    return run if rundir.is_run(run) else None


def load_prior(path: str | Path) -> LatentPrior | None:
    """The fitted prior of a model path (in its checkpoint or model folder), or None if it has none."""
    try:
        folder = identify(path).folder
    except CheckpointError:
        folder = Path(path)
    file = folder / PRIOR_FILE
    return LatentPrior.load(file) if file.is_file() else None


def with_pretrained_architecture(cfg: Config) -> Config:
    """cfg whose model.pretrained is a diffusers AutoencoderKL folder, with that folder's
    architecture (an imgvae checkpoint or export must match the config as it is)."""
    try:
        where = identify(cfg.model.pretrained)
    except CheckpointError:
        return cfg  # init_from says what is wrong with the path
    return with_folder_architecture(cfg, where.folder) if where.kind == "diffusers" else cfg


def init_from(model: torch.nn.Module, path: str | Path) -> None:
    """Initialise model (before training) with the weights at `path`: a diffusers AutoencoderKL
    folder, or an imgvae checkpoint or export of the same model (its EMA weights when it kept them)."""
    try:
        where = identify(path)
    except CheckpointError:
        raise CheckpointError(f"model.pretrained: {path} is neither a checkpoint nor a model folder") from None
    if where.kind == "diffusers":
        return load_pretrained(model, where.folder)
    source, _, folder = open_model(path)
    load_weights(model, source.state_dict(), folder)


def _model_with(cfg: Config, overrides, weights: dict, source: Path):
    """The model of cfg with the overrides, at the image size they ask for, with these weights."""
    changed = with_use_overrides(cfg, overrides)
    model = build_vae(changed)
    try:
        load_weights(model, weights, source)
    except CheckpointError:
        if changed.data.image_size != cfg.data.image_size:
            raise ConfigError(f"data.image_size: this model takes {cfg.data.image_size} px images") from None
        raise
    return model, changed


def with_use_overrides(cfg: Config, overrides: list[str] | dict | None) -> Config:
    """A trained model's config with overrides of its data, eval and prior sections; the
    model's own settings cannot change."""
    changed = with_overrides(cfg, overrides)
    fixed = [f"{name}.*" for name in ("model", "loss", "train") if getattr(changed, name) != getattr(cfg, name)]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot change for a trained model; only {', '.join(OVERRIDABLE)} keys")
    return changed
