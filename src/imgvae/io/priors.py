"""The priors a model path has besides N(0, I): its fitted Gaussian (mixture), kept in the
checkpoint folder, and its flow prior, a run of its own in PRIOR_RUN beside the autoencoder
(the run folder, or the model folder), which records the autoencoder's weights by their
SHA-256: a prior is used only with the weights it was trained on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from imgvae.config import ConfigError, PriorConfig, from_dict
from imgvae.io.checkpoint import CheckpointError, _load_safetensors, load_weights, resolve_checkpoint
from imgvae.io.paths import identify, load_prior, run_dir_of
from imgvae.models.base import VAE
from imgvae.models.flow import FlowPrior
from imgvae.models.generate import sample, sample_flow
from imgvae.rundir import CONFIG, read_json

PRIOR_RUN = "prior-flow"  # the flow prior's run folder, beside the autoencoder
PRIORS = ("standard", "gmm", "flow")


def weights_file(path: str | Path, ema: bool = True) -> Path:
    """The weights file a model path's model is read from (the EMA weights when kept)."""
    where = identify(path)
    if where.kind == "checkpoint":
        averaged = where.folder / "ema.safetensors"
        return averaged if ema and averaged.is_file() else where.folder / "model.safetensors"
    if where.kind == "export":
        return where.folder / "model.safetensors"
    return where.folder / "diffusion_pytorch_model.safetensors"


def weights_digest(path: str | Path) -> str:
    """SHA-256 of the weights a model path's model is read from."""
    digest = hashlib.sha256()
    with open(weights_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def home_of(path: str | Path) -> Path:
    """Where a model path's priors live: its run folder, else its model folder."""
    run = run_dir_of(path)
    return run if run is not None else identify(path).folder


def default_prior_run(path: str | Path) -> Path:
    return home_of(path) / PRIOR_RUN


def read_prior_run(folder: Path) -> tuple[dict, PriorConfig]:
    """A flow prior run's config.yaml -> (its values, its prior section)."""
    try:
        values = yaml.safe_load((Path(folder) / CONFIG).read_text())
        return values, from_dict({"prior": values["prior"]}).prior
    except (OSError, KeyError, TypeError, yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{folder}: not a flow prior run ({type(e).__name__}: {e})") from None


def load_flow_prior(path: str | Path, device, prior_run: str | Path | None = None,
                    required: bool = False) -> tuple[FlowPrior, PriorConfig] | None:
    """The flow prior of a model path (EMA weights, eval mode, on device) with its config, or None
    when it has none (CheckpointError with required). Refused in one line when it was trained on
    other weights than the model's."""
    folder = Path(prior_run) if prior_run is not None else default_prior_run(path)
    if not (folder / CONFIG).is_file() or not (folder / "checkpoints" / "last").exists():
        if required or prior_run is not None:
            raise CheckpointError(f"{path} has no flow prior in {folder}: run `imgvae train-prior {path}` first")
        return None
    values, cfg = read_prior_run(folder)
    expected, found = values["source"]["weights_sha256"], weights_digest(path)
    if expected != found:
        raise CheckpointError(f"{folder} is the flow prior of other weights ({values['source']['path']}, sha256 "
                              f"{expected[:12]}...), not of {path} (sha256 {found[:12]}...)")
    checkpoint = resolve_checkpoint(folder)
    prior = FlowPrior(cfg, tuple(values["latent_shape"]))
    averaged = checkpoint / "ema.safetensors"
    load_weights(prior, _load_safetensors(averaged if averaged.is_file() else checkpoint / "model.safetensors",
                                          device), checkpoint)
    return prior.to(device).eval(), cfg


def available_priors(path: str | Path, prior_run: str | Path | None = None) -> list[str]:
    """The priors a model path has, of PRIORS: N(0, I) always, gmm and flow when made."""
    priors = ["standard"]
    if load_prior(path) is not None:
        priors.append("gmm")
    folder = Path(prior_run) if prior_run is not None else default_prior_run(path)
    if (folder / CONFIG).is_file() and (folder / "checkpoints" / "last").exists():
        priors.append("flow")
    return priors


def prior_summary(folder: Path) -> dict | None:
    """A flow prior run's summary.json (training time, steps), if any."""
    return read_json(Path(folder) / "summary.json")


def prior_sampler(checkpoint: str | Path, model: VAE, kind: str = "auto", *, temperature: float = 1.0,
                  steps: int | None = None, solver: str | None = None, prior_run: str | Path | None = None):
    """The prior `kind` of a model path ("standard" N(0, I), "gmm" its fitted mixture, "flow" its
    flow prior; "auto": flow, else gmm, else standard) -> (kind, draw(n, seed) -> [0, 1] images).
    A prior it does not have is refused in one line, as is a flow prior of other weights."""
    device = next(model.parameters()).device
    if kind in ("auto", "flow"):
        found = load_flow_prior(checkpoint, device, prior_run, required=kind == "flow")
        if found is not None:
            flow, cfg = found
            steps, solver = steps or cfg.steps, solver or cfg.solver
            return "flow", lambda n, seed: sample_flow(model, flow, n, seed, steps, solver, temperature)
    fitted = None if kind == "standard" else load_prior(checkpoint)
    if kind in ("gmm", "fitted") and fitted is None:
        raise CheckpointError(f"{checkpoint} has no fitted prior: run `imgvae fit-prior {checkpoint}` first")
    name = "standard" if fitted is None else "gmm"
    return name, lambda n, seed: sample(model, n, seed, temperature, fitted)
