"""Where a learned prior lives and how it is read back: a run folder of its own beside the model
(the run folder, or the model folder), prior-<kind>/, holding config.yaml (its kind, its prior
section, the latent shape and the autoencoder it models, by the SHA-256 of its weights) and
checkpoints/ as the engine writes them. A learned prior is used only with the weights it was
trained on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from imgvae.config import PRIOR_CONFIGS, ConfigError, PriorConfig, section_of
from imgvae.data.labels import LABELS_FILE
from imgvae.io.checkpoint import CheckpointError, _load_safetensors, for_use, load_weights, resolve_checkpoint
from imgvae.io.paths import provenance_of
from imgvae.rundir import CHECKPOINTS, CONFIG, read_json


def source_of(model, model_name: str) -> dict:
    """What a learned prior records of the autoencoder it models (as open_model read it)."""
    where = provenance_of(model)
    return {"path": where.path, "weights": str(where.weights), "weights_sha256": where.digest(), "model": model_name}


def default_run(model, kind: str) -> Path:
    """Where a learned prior of an opened model lives by default: prior-<kind>/ in its run folder,
    else in its model folder."""
    return provenance_of(model).home / f"prior-{kind}"


def has_run(folder: Path) -> bool:
    return (Path(folder) / CONFIG).is_file() and (Path(folder) / CHECKPOINTS / "last").exists()


def read_run(folder: Path) -> tuple[dict, PriorConfig]:
    """A learned prior run's config.yaml -> (its values, its prior section). Runs written before each
    kind had a section of its own kept their recipe in a `train` section, the kind and the backbone
    built beside a prior section of every kind's keys; they read as the same section."""
    try:
        values = yaml.safe_load((Path(folder) / CONFIG).read_text())
        kind = values.get("kind", "flow")
        section = dict(values["prior"])
        if "train" in values:
            names = {f.name for f in dataclasses.fields(PRIOR_CONFIGS[kind])}
            section = {k: v for k, v in (section | values["train"]).items() if k in names}
            spatial = len(values["latent_shape"]) == 3
            section["backbone"] = values.get("backbone") or ("unet" if spatial or kind != "flow" else "mlp")
            section["backbone"] = "transformer" if kind == "tokens" else section["backbone"]
        return values, section_of(PriorConfig, section | {"kind": kind}, "prior.")
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{folder}: not a learned prior run ({type(e).__name__}: {e})") from None


def run_of(model, kind: str, prior_run: str | Path | None = None) -> Path | None:
    """The folder an opened model keeps its learned prior `kind` in: prior_run when it is one of that
    kind, else the default one beside the model (None for a model built in code)."""
    if prior_run is not None and has_run(Path(prior_run)) and read_run(Path(prior_run))[1].kind == kind:
        return Path(prior_run)
    return None if provenance_of(model) is None else default_run(model, kind)


def refuse_other_weights(folder: Path, values: dict, model) -> None:
    """One line when the prior run in `folder` was trained on other weights than the opened model's."""
    where = provenance_of(model)
    expected, found = values["source"]["weights_sha256"], where.digest()
    if expected != found:
        shown = f"sha256 {found[:12]}..." if found else "its weights file is gone: replaced by a running training?"
        raise CheckpointError(f"{folder} is the {values.get('kind', 'flow')} prior of other weights "
                              f"({values['source']['path']}, sha256 {expected[:12]}...), not of {where.path} "
                              f"({shown})")


@dataclass
class Loaded:
    """A learned prior read back: its network (EMA weights, eval mode), its section, its folder, and
    a conditional one's label vocabulary and its training rows' label sets (N, L)."""

    network: torch.nn.Module
    section: PriorConfig
    folder: Path
    vocabulary: list[str]
    train_labels: np.ndarray | None
    label_spec: str | None = None  # the data.labels its latents were encoded with


def latent_labels(latents: Path) -> tuple[list[str], np.ndarray | None]:
    """A latents folder's label vocabulary and rows (N, L), uint8 (labels.npy); ([], None) without labels."""
    manifest = read_json(Path(latents) / "manifest.json") or {}
    vocabulary = (manifest.get("labels") or {}).get("vocabulary", [])
    return vocabulary, np.load(Path(latents) / LABELS_FILE) if vocabulary else None


def load(model, kind, device, prior_run: str | Path | None = None, required: bool = False) -> Loaded | None:
    """The learned prior `kind` (a priors.learned.LearnedPrior) of an opened model (Loaded), or None
    when it has none (CheckpointError with required or a prior_run given). Refused in one line when
    it was trained on other weights than the model's."""
    path = provenance_of(model).path
    folder = Path(prior_run) if prior_run is not None else default_run(model, kind.name)
    if not has_run(folder):
        if required or prior_run is not None:
            others = sorted(p.name for p in folder.parent.glob(f"{folder.name}*") if has_run(p))
            hint = f", or name one with --prior-run: {', '.join(others)}" if others else ""
            raise CheckpointError(f"{path} has no {kind.name} prior in {folder}: run `imgvae train-prior {path}` "
                                  f"first{hint}")
        return None
    values, section = read_run(folder)
    if section.kind != kind.name:
        raise CheckpointError(f"{folder} is a {section.kind} prior, not a {kind.name} prior")
    refuse_other_weights(folder, values, model)
    checkpoint = resolve_checkpoint(folder)
    vocabulary = values.get("labels", [])
    prior = kind.build(section, tuple(values["latent_shape"]), model, len(vocabulary))
    averaged = checkpoint / "ema.safetensors"
    weights = _load_safetensors(averaged if averaged.is_file() else checkpoint / "model.safetensors", device)
    load_weights(prior, for_use(weights), checkpoint)  # the alignment projector is training's only
    train_labels, spec = None, None
    if vocabulary:
        latents = folder / "latents"
        train_labels = latent_labels(latents)[1][np.load(latents / "valid.npy")]
        spec = read_json(latents / "manifest.json")["labels"]["spec"]
    return Loaded(prior.to(device).eval(), section, folder, vocabulary, train_labels, spec)


def run_summary(folder: Path) -> dict | None:
    """A learned prior run's summary.json (training time, steps), if any."""
    return read_json(Path(folder) / "summary.json")
