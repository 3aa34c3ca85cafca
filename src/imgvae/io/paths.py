"""What a model path is, answered once, and opening it: an imgvae run folder, a checkpoint
folder (or a run's checkpoints/), a folder `imgvae export` wrote, a diffusers AutoencoderKL
folder, or a diffusers pipeline folder holding one in vae/. An opened model keeps where it was
read from (its Provenance): later questions (its priors, its run folder, its weights' digest)
are answered from that, never by resolving the path again while a training replaces checkpoints."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from imgvae import rundir
from imgvae.config import Config, ConfigError, merge_overrides, with_overrides, with_prior_kind
from imgvae.data.datasets import ONE_CENTRE_VIEW
from imgvae.io.checkpoint import (
    WEIGHTS,
    CheckpointError,
    _load_safetensors,
    _read_state,
    _read_whole,
    config_of,
    for_use,
    load_weights,
    resolve_checkpoint,
)
from imgvae.io.interop import find_folder, folder_config, load_pretrained, open_folder, with_folder_architecture
from imgvae.models.registry import build_vae
from imgvae.runtime import pick_device

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


@dataclass(frozen=True)
class Provenance:
    """Where an opened model was read from: the path as given, its kind, the folder and the weights
    file read, its run folder (None for an export or a diffusers folder) and home, the folder its
    priors live in (the run folder, else the model folder)."""

    path: str
    kind: str
    folder: Path
    weights: Path
    run: Path | None

    @property
    def home(self) -> Path:
        return self.run if self.run is not None else self.folder

    def digest(self) -> str | None:
        """SHA-256 of the weights file read; None when it is gone (a running training pruned it)."""
        digest = hashlib.sha256()
        try:
            with open(self.weights, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            return None
        return digest.hexdigest()


def provenance_of(model) -> Provenance | None:
    """Where a model open_model returned was read from (None for a model built in code)."""
    return getattr(model, "provenance", None)


def _run_of(folder: Path) -> Path | None:
    run = folder.parent.parent
    return run if folder.parent.name == rundir.CHECKPOINTS and rundir.is_run(run) else None


def is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def open_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
               overrides: list[str] | dict | None = None, prior_kind: str | None = None):
    """Any model path (see identify) -> (model in eval mode on device, its Config with the
    overrides, the folder read); with the EMA weights when the run kept them (and ema is true).
    Overrides may change the data, eval and prior keys, data.image_size too for a model whose
    weights fit that size (the convolutional ones); prior_kind: the prior section is that kind's
    (the run's own when it is of that kind, else its defaults) before the overrides."""
    where = identify(path)

    def configured(cfg: Config) -> Config:
        return with_prior_kind(cfg, prior_kind) if prior_kind else cfg

    if where.kind == "export":
        cfg = configured(config_of(json.loads((where.folder / "config.json").read_text()), where.folder))
        model, cfg = _model_with(cfg, overrides, _load_safetensors(where.folder / WEIGHTS, device), where.folder)
        model.provenance = Provenance(str(path), "export", where.folder, where.folder / WEIGHTS, None)
        return model.to(device).eval(), cfg, where.folder
    if where.kind == "diffusers":
        size = merge_overrides(overrides).get("data", {}).get("image_size")
        model, cfg = open_folder(where.folder, device, size)
        weights = where.folder / "diffusion_pytorch_model.safetensors"
        model.provenance = Provenance(str(path), "diffusers", where.folder, weights, None)
        return model, with_use_overrides(configured(cfg), overrides), where.folder

    def read(folder: Path):
        cfg = configured(config_of(_read_state(folder, device), folder))
        averaged = folder / "ema.safetensors"
        file = averaged if ema and averaged.is_file() else folder / WEIGHTS
        model, cfg = _model_with(cfg, overrides, _load_safetensors(file, device), folder)
        model.provenance = Provenance(str(path), "checkpoint", folder, file, _run_of(folder))
        return model.to(device).eval(), cfg, folder

    return _read_whole(path, read)


def open_for(checkpoint: str | Path, sources: list[str] | None, overrides, device: str = "auto",
             one_view: bool = False, prior_kind: str | None = None):
    """The model at `checkpoint` on `device` ("auto": picked) with the use overrides -> (model, cfg,
    folder). Images a user gives (sources), or every image when one_view, are read as they are:
    one centre view each, unless the overrides say otherwise."""
    given = merge_overrides({"data": ONE_CENTRE_VIEW} if sources or one_view else None, overrides)
    return open_model(checkpoint, pick_device(device), overrides=given, prior_kind=prior_kind)


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
        return _run_of(resolve_checkpoint(path))
    except CheckpointError:  # an export or a diffusers folder: no run
        return None


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
        load_weights(model, for_use(weights), source)
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
