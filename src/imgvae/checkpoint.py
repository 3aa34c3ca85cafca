"""Checkpoints: a folder holding model.safetensors + state.pt, written atomically.

state.pt holds only tensors, numbers, strings, lists and dicts (optimiser,
scheduler, RNG, epoch, step, config), so it loads with weights_only=True and
never runs code from the file. A checkpoint folder is written under a temp
name and renamed into place; `last` is a symlink swapped atomically, so a
crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, from_dict, merge_overrides, with_overrides
from .interop import find_folder, folder_config, load_pretrained, open_folder, with_folder_architecture
from .models import build_vae

FORMAT_VERSION = 1
WEIGHTS, STATE, LAST = "model.safetensors", "state.pt", "last"
READ_ATTEMPTS = 5


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or from another format."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (.module) and torch.compile (._orig_mod)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _plain_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in unwrap(module).state_dict().items()}


def save_checkpoint(ckpt_root: Path, name: str, model: torch.nn.Module, state: dict,
                    extra: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write ckpt_root/name/{model.safetensors,state.pt} (plus KEY.safetensors for each
    extra module, e.g. "ema", "discriminator") and point `last` at it. A write that fails
    (a full disk, a read-only folder) removes its temp folder, keeps the checkpoints there
    were and raises CheckpointError."""
    tmp = ckpt_root / f".tmp-{name}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {WEIGHTS: model, **{f"{key}.safetensors": module for key, module in (extra or {}).items()}}
        for filename, module in files.items():
            save_file(_plain_weights(module), str(tmp / filename))
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp / STATE)
        for f in (*files, STATE):
            _fsync(tmp / f)
        return _publish(ckpt_root, name, tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {name} in {ckpt_root} ({reason})") from None


def _publish(ckpt_root: Path, name: str, tmp: Path) -> Path:
    """Rename the written temp folder into place and point `last` at it, atomically."""
    final = ckpt_root / name
    if final.exists():  # re-written (e.g. after a resume): move the old one aside first
        old = ckpt_root / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    link = ckpt_root / f".tmp-{LAST}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(name, link)
    os.replace(link, ckpt_root / LAST)
    _fsync(ckpt_root)
    return final


def prune_checkpoints(ckpt_root: Path, keep: set[str]) -> None:
    """Delete checkpoint folders not in keep (the one `last` points to always stays)."""
    last = (ckpt_root / LAST).resolve().name if (ckpt_root / LAST).exists() else None
    for path in ckpt_root.iterdir():
        if path.is_dir() and not path.is_symlink() and not path.name.startswith(".") and path.name not in keep | {last}:
            shutil.rmtree(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a checkpoints/ folder or a run folder -> the checkpoint folder,
    `last` followed once: the real folder, which a running training does not write into."""
    path = Path(path)
    for candidate in (path, path / LAST, path / "checkpoints" / LAST):
        if (candidate / WEIGHTS).is_file() and (candidate / STATE).is_file():
            return candidate.resolve()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    raise CheckpointError(
        f"{str(path)!r} is not a checkpoint: expected a folder with {WEIGHTS} and {STATE}, "
        f"or a run folder with checkpoints/{LAST}"
    )


def _read_whole(path: str | Path, read):
    """read(folder) for the checkpoint at `path`; when a running training prunes that folder
    meanwhile (it replaced it with a newer one), again on the newer one: every file then
    comes from one checkpoint."""
    for _ in range(READ_ATTEMPTS):
        folder = resolve_checkpoint(path)
        try:
            return read(folder)
        except CheckpointError:
            if resolve_checkpoint(path) == folder:  # not replaced: the files themselves are bad
                raise
    raise CheckpointError(f"{path}: its checkpoints changed {READ_ATTEMPTS} times while being read")


def _load_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # RuntimeError: torch's mmap of a lost file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_extra(path: str | Path, key: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """The weights saved as `extra[key]` (e.g. "ema"), or None if the checkpoint has none."""
    file = resolve_checkpoint(path) / f"{key}.safetensors"
    return _load_safetensors(file, device) if file.is_file() else None


def _read_state(folder: Path, device) -> dict:
    try:
        state = torch.load(folder / STATE, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, EOF/RuntimeError when truncated
        raise CheckpointError(f"{folder / STATE}: refused or unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"{folder / STATE}: format version {found!r}, this imgvae reads {FORMAT_VERSION}")
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """-> (weights, state) of one checkpoint. Never unpickles arbitrary objects."""
    return _read_whole(path, lambda folder: (_load_safetensors(folder / WEIGHTS, device), _read_state(folder, device)))


def load_weights(model: torch.nn.Module, weights: dict, source: str | Path) -> None:
    """load_state_dict(strict=True) with a message naming the checkpoint."""
    try:
        unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit this model ({str(e).splitlines()[0]})") from None


def open_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
               overrides: list[str] | dict | None = None):
    """A checkpoint (or run folder), a folder `export` wrote, or a diffusers AutoencoderKL folder
    -> (model in eval mode on device, its Config with the overrides, the folder read); with the
    EMA weights when the run kept them (and ema is true). Overrides may change the data, eval
    and prior keys, data.image_size too for a model whose weights fit that size (the
    convolutional ones)."""
    try:
        resolve_checkpoint(path)
    except CheckpointError:
        folder = find_folder(path)
        if folder is None:
            raise
        if is_export(folder):
            return _open_export(folder, device, overrides)
        model, cfg = open_folder(folder, device, merge_overrides(overrides).get("data", {}).get("image_size"))
        return model, with_use_overrides(cfg, overrides), folder

    def read(folder: Path):
        cfg = config_of(_read_state(folder, device), folder)
        averaged = folder / "ema.safetensors"
        weights = _load_safetensors(averaged if ema and averaged.is_file() else folder / WEIGHTS, device)
        model, cfg = _model_with(cfg, overrides, weights, folder)
        return model.to(device).eval(), cfg, folder

    return _read_whole(path, read)


def config_of(state: dict, source: Path) -> Config:
    try:
        return from_dict(state["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{source}: the model's config cannot be read ({e})") from None


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


def with_pretrained_architecture(cfg: Config) -> Config:
    """cfg whose model.pretrained is a diffusers AutoencoderKL folder, with that folder's
    architecture (an imgvae checkpoint must match the config as it is)."""
    folder = None
    try:
        resolve_checkpoint(cfg.model.pretrained)
    except CheckpointError:
        folder = find_folder(cfg.model.pretrained)
    return cfg if folder is None or is_export(folder) else with_folder_architecture(cfg, folder)


def init_from(model: torch.nn.Module, path: str | Path) -> None:
    """Initialise model (before training) with the weights at `path`: a diffusers AutoencoderKL
    folder, or an imgvae checkpoint or export of the same model (its EMA weights when it kept them)."""
    try:
        resolve_checkpoint(path)
    except CheckpointError:
        folder = find_folder(path)
        if folder is None:
            raise CheckpointError(f"model.pretrained: {path} is neither a checkpoint nor a model folder") from None
        if not is_export(folder):
            return load_pretrained(model, folder)
    source, _, folder = open_model(path)
    load_weights(model, source.state_dict(), folder)


def model_source(path: str | Path) -> tuple[str, int]:
    """What a model path is ("checkpoint", "export" or "diffusers") and the image size its model
    was made for, from its config alone (no weights read)."""
    try:
        return "checkpoint", config_of(_read_state(resolve_checkpoint(path), "cpu"), Path(path)).data.image_size
    except CheckpointError:
        folder = find_folder(path)
        if folder is None:
            raise
    if is_export(folder):
        return "export", config_of(json.loads((folder / "config.json").read_text()), folder).data.image_size
    return "diffusers", folder_config(folder).data.image_size


EXPORT_FORMAT = "imgvae-model"  # config.json of a folder `imgvae export --format safetensors` wrote


def is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _open_export(folder: Path, device, overrides):
    cfg = config_of(json.loads((folder / "config.json").read_text()), folder)
    model, cfg = _model_with(cfg, overrides, _load_safetensors(folder / WEIGHTS, device), folder)
    return model.to(device).eval(), cfg, folder


# What can change for a trained model: how images are read and how it is looked at.
OVERRIDABLE = ("data", "eval", "prior")


def with_use_overrides(cfg: Config, overrides: list[str] | dict | None) -> Config:
    """A trained model's config with overrides of its data, eval and prior sections; the
    model's own settings cannot change."""
    changed = with_overrides(cfg, overrides)
    fixed = [f"{name}.*" for name in ("model", "loss", "train") if getattr(changed, name) != getattr(cfg, name)]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot change for a trained model; only {', '.join(OVERRIDABLE)} keys")
    return changed


def load_model(path: str | Path, device: str | torch.device = "cpu", ema: bool = True):
    """A checkpoint (or run folder) -> (model in eval mode on device, its Config); see open_model."""
    model, cfg, _ = open_model(path, device, ema)
    return model, cfg
