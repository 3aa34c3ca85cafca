"""What each `imgvae` verb does, as a function a notebook calls with paths: open the model a
path names, read the images, call the library, write the files. cli.py only parses arguments
and calls these; `imgvae train` is workflow.train_and_evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from imgvae import rundir
from imgvae.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    from_dict,
    merge_overrides,
    to_dict,
    with_overrides,
)
from imgvae.data.datasets import ONE_CENTRE_VIEW, EpochViews, build_dataset, load_image_file
from imgvae.data.decode import normalize
from imgvae.data.sources import SourceError
from imgvae.evaluation.evaluate import evaluate
from imgvae.evaluation.generation import score_priors
from imgvae.io.export import FORMATS, export_format, write_export
from imgvae.io.latents import encode_dataset, latent_moments, latent_scale, scale_choice
from imgvae.io.paths import load_prior, open_model, run_dir_of
from imgvae.io.pictures import save_grid
from imgvae.io.priors import (
    default_prior_run,
    prior_sampler,
    read_prior_run,
    weights_digest,
    weights_file,
)
from imgvae.models.base import VAE
from imgvae.models.flow import backbone_of
from imgvae.models.generate import interpolate, reconstruct, sample
from imgvae.models.prior import PRIOR_FILE, LatentPrior, fit_prior
from imgvae.models.quantized import learned_prior_kind, refuse_prior
from imgvae.models.tokens import TokenPrior
from imgvae.rundir import METRICS, write_text_atomic
from imgvae.runtime import pick_device
from imgvae.train.engine import fit
from imgvae.train.prior import FlowTask, TokenTask, prior_recipe


def open_for(checkpoint: str | Path, sources: list[str] | None, overrides, device: str, one_view: bool = False):
    """The model at `checkpoint` with the use overrides -> (model, cfg, folder). Images a user
    gives (sources), or every image when one_view, are read as they are: one centre view each,
    unless the overrides say otherwise."""
    given = merge_overrides({"data": ONE_CENTRE_VIEW} if sources or one_view else None, overrides)
    return open_model(checkpoint, pick_device(device), overrides=given)


def evaluate_checkpoint(checkpoint: str | Path, sources: list[str] | None = None, out: str | Path | None = None,
                        overrides: list[str] | dict | None = None, device: str = "auto", progress: bool = True
                        ) -> tuple[dict, Path]:
    """Evaluate a model as its config's `eval` section says (overrides of the data, eval and prior
    sections such as "eval.iw_samples=64" change it; its fitted prior when it has one) on `sources`,
    one centre view per image, or by default on its data.eval as the run saw it, and write
    metrics.json (default: into its run folder; a model without one writes nothing unless `out`
    is given). -> (metrics, path or None)."""
    model, cfg, folder = open_for(checkpoint, sources, overrides, device)
    sources = sources or cfg.data.eval
    if not sources:
        raise ConfigError("no evaluation data: pass --data SOURCE (the run's config has no data.eval)")
    metrics = {"checkpoint": str(folder), **evaluate(model, cfg, sources, prior=load_prior(folder), progress=progress)}
    if cfg.eval.generation_images:
        if (generation := score_priors(folder, model, cfg, sources, progress)) is not None:
            metrics["generation"] = generation
    run = run_dir_of(folder)
    path = Path(out) if out else (run / METRICS if run is not None else None)
    if path is None:  # a model without a run folder: nothing is written unless asked (-o)
        return metrics, None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(metrics, indent=2))
    return metrics, path


def fit_checkpoint_prior(checkpoint: str | Path, sources: list[str] | None = None,
                         overrides: list[str] | dict | None = None, *,
                         device: str = "auto", progress: bool = True) -> tuple[LatentPrior, Path]:
    """Fit a prior for a model (its EMA weights when it has them) on `sources` (one centre view
    each; default: its config's data.train, with the training crops of epoch 1, no flips), as its
    config's `prior` section says (prior.images, prior.components; overrides such as
    "prior.components=10" change them), and write CKPT/prior.safetensors, which `sample` and
    `evaluate` then use."""
    model, cfg, folder = open_for(checkpoint, sources, overrides, device)
    refuse_prior(cfg.model, "gmm", "fit-prior")
    dataset = build_dataset(sources or cfg.data.train, cfg.data, train=True, seed=cfg.train.seed)
    prior = fit_prior(model, dataset, limit=cfg.prior.images, components=cfg.prior.components,
                      batch_size=cfg.eval_batch_size, seed=cfg.train.seed, progress=progress)
    path = folder / PRIOR_FILE
    prior.save(path)
    return prior, path


def encode_latents(checkpoint: str | Path, out: str | Path, sources: list[str] | None = None, *,
                   logvar: bool = False, overrides: list[str] | dict | None = None, device: str = "auto",
                   chunk: int = 1024, scale: str | None = None, progress: bool = True) -> dict:
    """Encode every image of `sources` (default: the run's data.train), one centre view each
    unless overrides say otherwise, into the folder `out` (io.latents.encode_dataset says what
    it holds; scale: io.latents.scale_choice). -> the manifest."""
    model, cfg, folder = open_for(checkpoint, sources, overrides, device, one_view=True)
    specs = sources or cfg.data.train
    dataset = build_dataset(specs, cfg.data, train=False, seed=cfg.train.seed)
    return encode_dataset(model, dataset, out, specs, folder, batch=cfg.eval_batch_size,
                          num_workers=cfg.data.num_workers, logvar=logvar, chunk=chunk, progress=progress,
                          model_cfg=cfg.model, scale=scale)


def train_prior(checkpoint: str | Path, out: str | Path | None = None, sources: list[str] | None = None,
                overrides: list[str] | dict | None = None, *, resume: bool = False, device: str = "auto",
                progress: bool = True, callbacks=()) -> dict:
    """Train the learned prior of a model (its EMA weights when kept) with the engine: a flow prior
    for a continuous latent, a token prior (MaskGIT) for a discrete one, into `out` (default:
    prior-flow/ or prior-tokens/ beside it). The training views of its data.train (or `sources`,
    one centre view each) are encoded once into out/latents, then prior.epochs are trained.
    Overrides: the model's data / prior keys, and train.* keys of the prior's own run (device,
    precision, time_limit, ...). resume: continue the run in `out`. -> its summary."""
    values = merge_overrides(overrides)
    run_keys = values.pop("train", {})
    model, cfg, folder = open_for(checkpoint, sources, values, device)
    kind = learned_prior_kind(cfg.model)
    refuse_prior(cfg.model, kind if cfg.prior.kind == "gmm" else cfg.prior.kind, "train-prior")
    out = Path(out) if out else default_prior_run(checkpoint, kind)
    recipe = to_dict(prior_recipe(cfg.train, cfg.prior))  # the autoencoder run's train section, the prior's recipe
    if resume:  # the prior run's own keys, under those given now (prior.epochs=N continues it)
        saved, saved_prior = read_prior_run(out)
        given = values.get("prior", {})
        cfg = with_overrides(cfg, merge_overrides({"prior": to_dict(saved_prior)}, {"prior": given}))
        asked = {k: v for k, v in to_dict(prior_recipe(cfg.train, cfg.prior)).items() if k in given}
        recipe = saved["train"] | asked
    if kind == "flow":
        backbone_of(cfg.prior, model.latent_shape)  # a backbone that cannot take this latent: refused before any work
    else:
        TokenPrior(cfg.prior, model.token_shape, 2)  # the same for a token prior's keys
    tc = from_dict({"train": recipe | {"device": device} | run_keys})
    source = {"path": str(checkpoint), "weights": str(weights_file(checkpoint)),
              "weights_sha256": weights_digest(checkpoint), "model": cfg.model.name}
    latents = out / "latents"
    if not (latents / "manifest.json").is_file():
        specs = sources or cfg.data.train
        views = EpochViews(build_dataset(specs, cfg.data, train=True, seed=cfg.train.seed), cfg.prior.view_epochs,
                           mirror=cfg.data.hflip)
        encode_dataset(model, views, latents, specs, folder, batch=cfg.eval_batch_size,
                       num_workers=cfg.data.num_workers, logvar=kind == "flow", progress=progress, model_cfg=cfg.model)

    def make_task(run: TrainConfig, procs):
        shown = model.to(procs.device) if procs.main else None
        if kind == "flow":
            return FlowTask(cfg.prior, run, procs, latents, source, shown)
        return TokenTask(cfg.prior, run, procs, latents, source, shown, codebook_size=model.codebook_size)

    summary = fit(make_task, tc.train, out, resume=resume, progress=progress, callbacks=callbacks)
    run = run_dir_of(checkpoint)
    if summary and run is not None:  # its samples beside the run's other pictures, for the report
        _, draw = prior_sampler(checkpoint, model, kind, prior_run=out)
        n = cfg.eval.grid_size
        save_grid(draw(n * n, cfg.train.seed), n, run / rundir.GRIDS / rundir.LEARNED_PRIOR_GRID[kind])
    return summary


def export_model(checkpoint: str | Path, out_dir: str | Path, fmt: str | None = None, sources: list[str] | None = None,
                 images: int = 10_000, overrides: list[str] | dict | None = None, device: str = "auto",
                 scale: str | None = None, progress: bool = True) -> Path:
    """Write the model of `checkpoint` (its EMA weights when kept) into the new folder out_dir,
    as `fmt` (default: diffusers for the KL models, else safetensors). The latent
    statistics come from `images` training images (default sources: its data.train, its
    training crops, as `fit-prior` sees them); the latent scale written is the model's own
    (a diffusers folder's it started from) or those statistics' (scale: "keep" | "recompute",
    io.latents.scale_choice); the model card records both. -> out_dir."""
    if fmt not in (None, *FORMATS):  # before the model is read
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    model, cfg, folder = open_model(checkpoint, pick_device(device), overrides=overrides)
    fmt = export_format(model, cfg, fmt)
    scale_choice(cfg.model, scale)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"{out} exists and is not empty")
    dataset = build_dataset(sources or cfg.data.train, cfg.data, train=True, seed=cfg.train.seed)
    stats = latent_moments(model, dataset, cfg.eval_batch_size, images, progress)
    return write_export(model, cfg, folder, out, fmt, stats, min(images or len(dataset), len(dataset)),
                        latent_scale(cfg.model, stats, scale))


def reconstruct_files(model: VAE, cfg: DataConfig, paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Each image file, preprocessed as the eval split, next to its reconstruction:
    out_dir/<stem>_reconstruction.png (input | reconstruction), plus
    reconstructions.png with all pairs. Returns the written paths."""
    out = Path(out_dir)
    images = torch.stack([load_image_file(p, cfg) for p in paths])
    real = images.float() / 255
    recon = reconstruct(model, normalize(images))
    written = []
    for path, a, b in zip(paths, real, recon):
        target = out / f"{Path(path).stem}_reconstruction.png"
        save_grid(torch.stack([a, b]), 2, target)
        written.append(target)
    pairs = torch.stack([real, recon], 1).flatten(0, 1)
    save_grid(pairs, 2 * min(4, len(paths)), out / "reconstructions.png")
    return written + [out / "reconstructions.png"]


def sample_files(model: VAE, n: int, out_dir: str | Path, seed: int, temperature: float = 1.0,
                 prior: LatentPrior | None = None, draw=None) -> list[Path]:
    """n prior samples (from draw(n, seed), default N(0, T^2 I) or the fitted prior):
    out_dir/samples/sample_NNN.png each (a folder of exactly n images, as folder-based FID tools
    read them) and out_dir/samples.png, the grid, beside it."""
    out = Path(out_dir)
    images = draw(n, seed) if draw is not None else sample(model, n, seed, temperature, prior)
    written = []
    for i, image in enumerate(images):
        written.append(out / "samples" / f"sample_{i:03d}.png")
        save_grid(image[None], 1, written[-1])
    save_grid(images, math.ceil(math.sqrt(n)), out / "samples.png")
    return written + [out / "samples.png"]


def interpolate_files(model: VAE, cfg: DataConfig, path_a: str | Path, path_b: str | Path, steps: int,
                      out_dir: str | Path) -> Path:
    """out_dir/interpolation.png: row 1 linear, row 2 spherical; each row is
    image A, `steps` decoded latents from A's to B's, image B."""
    if steps < 2:
        raise ValueError(f"--steps must be >= 2, got {steps}")
    a, b = load_image_file(path_a, cfg), load_image_file(path_b, cfg)
    paths = interpolate(model, normalize(a[None])[0], normalize(b[None])[0], steps)
    ends = a.float()[None] / 255, b.float()[None] / 255
    rows = [torch.cat([ends[0], paths[kind], ends[1]]) for kind in ("linear", "spherical")]
    target = Path(out_dir) / "interpolation.png"
    save_grid(torch.cat(rows), steps + 2, target)
    return target
