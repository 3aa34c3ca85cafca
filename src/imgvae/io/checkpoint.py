"""Checkpoints: a folder holding model.safetensors + state.pt, written atomically.

state.pt holds only tensors, numbers, strings, lists and dicts (optimiser,
scheduler, RNG, epoch, step, config), so it loads with weights_only=True and
never runs code from the file. A checkpoint folder is written under a temp
name and renamed into place; `last` is a symlink swapped atomically, so a
crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from imgvae.config import Config, ConfigError, from_dict
from imgvae.rundir import CheckpointError

FORMAT_VERSION = 1
# Parameters only training uses (VA-VAE's latent projection, train/align.py; a flow prior's REPA
# projector, priors/flow.py): a model's users drop them.
TRAINING_ONLY = ("align_projection.", "projector.")
WEIGHTS, STATE, LAST = "model.safetensors", "state.pt", "last"
READ_ATTEMPTS = 5


def readable_by_group(path: Path) -> None:
    """The permissions the user's umask gives a new file (safetensors writes 0600 whatever it is)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """A safetensors file with the permissions of any other file the user writes."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    readable_by_group(path)


def one_line(e: BaseException) -> str:
    """An exception in one line: its first line; a pickle that weights_only refused, in imgvae's words
    (torch's advice to load it anyway is advice a user must not follow on a file they did not make)."""
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
        return "it holds objects other than tensors and plain values, which could run code when loaded"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].strip() if lines else ''}"


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
            save_weights(_plain_weights(module), tmp / filename)
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
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def load_extra(path: str | Path, key: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """The weights saved as `extra[key]` (e.g. "ema"), or None if the checkpoint has none."""
    file = resolve_checkpoint(path) / f"{key}.safetensors"
    return _load_safetensors(file, device) if file.is_file() else None


def _read_state(folder: Path, device) -> dict:
    try:
        state = torch.load(folder / STATE, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, EOF/RuntimeError when truncated
        raise CheckpointError(f"{folder / STATE}: refused or unreadable ({one_line(e)})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"{folder / STATE}: format version {found!r}, this imgvae reads {FORMAT_VERSION}")
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """-> (weights, state) of one checkpoint. Never unpickles arbitrary objects."""
    return _read_whole(path, lambda folder: (_load_safetensors(folder / WEIGHTS, device), _read_state(folder, device)))


def refuse_non_finite(weights: dict, source: str | Path) -> None:
    """One line when weights hold NaN or infinite values (a diverged run's): nothing computed from
    them would mean anything, and linear algebra on their outputs can crash the process."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = ", ..." if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or infinite values ({bad[0]}{more}): "
                              "a diverged run's weights; use an earlier checkpoint")


def for_use(weights: dict) -> dict:
    """A checkpoint's weights as a model's users load them: training-only parameters left out."""
    return {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY)}


def load_weights(model: torch.nn.Module, weights: dict, source: str | Path) -> None:
    """load_state_dict(strict=True) with a message naming the checkpoint; non-finite weights refused."""
    refuse_non_finite(weights, source)
    try:
        unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as e:
        if "encoder.0.weight" in weights and hasattr(unwrap(model).encoder, "down_blocks"):
            raise CheckpointError(f"{source}: a kl-f4 / kl-f8 model of imgvae 0.1, built of its own blocks; since 0.2 "
                                  "they are diffusers' blocks (they export to diffusers): train it again, or read it "
                                  "with imgvae 0.1") from None
        raise CheckpointError(f"{source}: weights do not fit this model ({str(e).splitlines()[0]})") from None


def config_of(state: dict, source: Path) -> Config:
    try:
        return from_dict(state["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{source}: the model's config cannot be read ({e})") from None
