"""The priors a model path has besides its own (N(0, I), or uniform codes for a discrete
latent): its fitted Gaussian (mixture), kept in the checkpoint folder, and its learned prior, a
run of its own beside the autoencoder (the run folder, or the model folder): prior-flow/ for a
continuous latent, prior-tokens/ for a discrete one. A learned prior records the autoencoder's
weights by their SHA-256: it is used only with the weights it was trained on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from imgvae.config import ConfigError, PriorConfig, from_dict, with_overrides
from imgvae.io.checkpoint import CheckpointError, _load_safetensors, load_weights, resolve_checkpoint
from imgvae.io.paths import identify, load_prior, run_dir_of
from imgvae.models.base import VAE
from imgvae.models.flow import FlowPrior
from imgvae.models.generate import sample, sample_flow, sample_tokens
from imgvae.models.tokens import TokenPrior
from imgvae.rundir import CONFIG, read_json

PRIOR_RUNS = {"flow": "prior-flow", "tokens": "prior-tokens"}  # a learned prior's run folder, beside the model
PRIORS = ("standard", "gmm", "flow", "tokens")
PRIOR_NAMES = {"standard": "model's own prior", "gmm": "fitted prior (gmm)", "flow": "flow prior",
               "tokens": "token prior"}


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


def default_prior_run(path: str | Path, kind: str = "flow") -> Path:
    return home_of(path) / PRIOR_RUNS[kind]


def read_prior_run(folder: Path) -> tuple[dict, PriorConfig]:
    """A learned prior run's config.yaml -> (its values, its prior section with the backbone it
    built: runs before the transformer backbone saved "auto" for the UNet, or the MLP when flat)."""
    try:
        values = yaml.safe_load((Path(folder) / CONFIG).read_text())
        cfg = from_dict({"prior": values["prior"]})
        built = values.get("backbone") or ("unet" if len(values["latent_shape"]) == 3 else "mlp")
        return values, with_overrides(cfg, {"prior": {"backbone": built}}).prior
    except (OSError, KeyError, TypeError, yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{folder}: not a learned prior run ({type(e).__name__}: {e})") from None


def has_prior_run(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / "checkpoints" / "last").exists()


def load_learned_prior(path: str | Path, device, kind: str = "flow", prior_run: str | Path | None = None,
                       required: bool = False, model: VAE | None = None):
    """The learned prior `kind` ("flow" or "tokens") of a model path (EMA weights, eval mode, on
    device) with its config, or None when it has none (CheckpointError with required). Refused in
    one line when it was trained on other weights than the model's."""
    folder = Path(prior_run) if prior_run is not None else default_prior_run(path, kind)
    if not has_prior_run(folder):
        if required or prior_run is not None:
            others = sorted(p.name for p in folder.parent.glob(f"{folder.name}*") if has_prior_run(p))
            hint = f", or name one with --prior-run: {', '.join(others)}" if others else ""
            raise CheckpointError(f"{path} has no {kind} prior in {folder}: run `imgvae train-prior {path}` "
                                  f"first{hint}")
        return None
    values, cfg = read_prior_run(folder)
    if values.get("kind", "flow") != kind:
        raise CheckpointError(f"{folder} is a {values.get('kind', 'flow')} prior, not a {kind} prior")
    expected, found = values["source"]["weights_sha256"], weights_digest(path)
    if expected != found:
        raise CheckpointError(f"{folder} is the {kind} prior of other weights ({values['source']['path']}, sha256 "
                              f"{expected[:12]}...), not of {path} (sha256 {found[:12]}...)")
    checkpoint = resolve_checkpoint(folder)
    if kind == "flow":
        prior = FlowPrior(cfg, tuple(values["latent_shape"]))
    else:
        prior = TokenPrior(cfg, tuple(values["latent_shape"]), model.codebook_size)
    averaged = checkpoint / "ema.safetensors"
    load_weights(prior, _load_safetensors(averaged if averaged.is_file() else checkpoint / "model.safetensors",
                                          device), checkpoint)
    return prior.to(device).eval(), cfg


def available_priors(path: str | Path, prior_run: str | Path | None = None) -> list[str]:
    """The priors a model path has, of PRIORS: its own (standard) always, gmm, flow and tokens when made."""
    priors = ["standard"]
    if load_prior(path) is not None:
        priors.append("gmm")
    for kind in ("flow", "tokens"):
        folder = default_prior_run(path, kind)
        if prior_run is not None and has_prior_run(Path(prior_run)):  # a prior run given: of its own kind
            folder = Path(prior_run) if read_prior_run(Path(prior_run))[0].get("kind", "flow") == kind else folder
        if has_prior_run(folder):
            priors.append(kind)
    return priors


def prior_summary(folder: Path) -> dict | None:
    """A flow prior run's summary.json (training time, steps), if any."""
    return read_json(Path(folder) / "summary.json")


def prior_sampler(checkpoint: str | Path, model: VAE, kind: str = "auto", *, temperature: float = 1.0,
                  steps: int | None = None, solver: str | None = None, prior_run: str | Path | None = None):
    """The prior `kind` of a model path ("standard": N(0, I), or uniform codes for a discrete
    latent; "gmm" its fitted mixture; "flow" / "tokens" its learned prior; "auto": the learned
    prior, else gmm, else standard) -> (kind, draw(n, seed) -> [0, 1] images). A prior it does not
    have is refused in one line, as is a learned prior of other weights."""
    device = next(model.parameters()).device
    learned = "tokens" if hasattr(model, "token_shape") else "flow"
    if kind in ("flow", "tokens") and kind != learned:
        what = "a discrete latent's codes" if kind == "tokens" else "continuous latents"
        raise CheckpointError(f"--prior {kind}: a {kind} prior models {what}; {checkpoint} has a "
                              f"{'discrete' if learned == 'tokens' else 'continuous'} latent (use --prior {learned})")
    if kind in ("auto", learned):
        found = load_learned_prior(checkpoint, device, learned, prior_run, required=kind == learned, model=model)
        if found is not None:
            prior, cfg = found
            steps = steps or cfg.steps
            if learned == "tokens":
                return "tokens", lambda n, seed: sample_tokens(model, prior, n, seed, steps, temperature)
            solver = solver or cfg.solver
            return "flow", lambda n, seed: sample_flow(model, prior, n, seed, steps, solver, temperature)
    fitted = None if kind == "standard" else load_prior(checkpoint)
    if kind in ("gmm", "fitted") and fitted is None:
        raise CheckpointError(f"{checkpoint} has no fitted prior: run `imgvae fit-prior {checkpoint}` first")
    name = "standard" if fitted is None else "gmm"
    return name, lambda n, seed: sample(model, n, seed, temperature, fitted)
