"""Learned priors: what the flow and token priors share. Each is a task of the training engine
(latent_task.py) over latents encoded once (an `imgvae encode` folder in PRIOR/latents), trained
under its own prior section's recipe in a run folder of its own (`train_prior`); the engine brings
checkpoints, resume, preemption, time limit, precision, compile, DDP, EMA, records. A trained one
draws through LabelledDraw."""

from __future__ import annotations

import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from imgvae import rundir
from imgvae.config import ConfigError, LearnedPriorConfig, PriorConfig, merge_overrides, section_of, to_dict
from imgvae.data.datasets import EpochViews, build_dataset
from imgvae.data.labels import read_labels
from imgvae.data.sources import open_sources, resolve_auto
from imgvae.io.latents import ALIGN_GRID, encode_dataset
from imgvae.io.paths import open_for, provenance_of
from imgvae.io.pictures import save_grid, save_labelled_rows
from imgvae.metrics.features import RepresentationFeatures
from imgvae.models.base import VAE
from imgvae.priors import runs
from imgvae.priors.latent_task import LatentTask
from imgvae.priors.registry import PriorKind, SampleOptions, learned_for, refuse, sampler, with_steps
from imgvae.runtime import RunError
from imgvae.train.engine import fit
from imgvae.train.processes import Processes

LABEL_ROWS = 8  # a conditional prior's picture by label: its most frequent labels


class LearnedPrior(PriorKind):
    """A kind of prior the engine trains (flow, tokens): subclasses give its task, its network and
    how it draws."""

    preference = 2
    task: type[LatentTask]
    logvar = False  # its latents folder keeps the posterior log-variances too

    def resolve(self, section: LearnedPriorConfig, model: VAE) -> LearnedPriorConfig:
        """The section as it will be trained for this model (its backbone decided); a key the model's
        latent cannot take is refused here, before any work."""
        raise NotImplementedError

    def build(self, section: LearnedPriorConfig, latent_shape: tuple[int, ...], model: VAE) -> torch.nn.Module:
        raise NotImplementedError

    def draw(self, model: VAE, prior, options: SampleOptions):
        raise NotImplementedError

    def check(self, cfg, model) -> None:
        super().check(cfg, model)
        source = open_sources(cfg.data.train)
        data = resolve_auto(cfg.data, source)
        views = len(source) * data.views_per_image * cfg.prior.view_epochs * (1 + data.hflip)
        if views < cfg.prior.batch_size:
            raise ConfigError(f"prior.after_training: {views} training views are fewer than one batch of the prior "
                              f"(prior.batch_size={cfg.prior.batch_size}): lower it")

    def make(self, checkpoint: Path, *, device: str, progress: bool) -> str:
        summary = train_prior(checkpoint, device=device, progress=progress)
        grid = Path(checkpoint).parent / rundir.GRIDS / rundir.prior_grid(self.section.title)
        checkpoint = Path(summary["folder"]) / summary["checkpoint"]
        return f"{self.section.title} trained ({summary['steps']} steps, {checkpoint}); its samples: {grid}"

    def draw_labels(self, loaded, options: SampleOptions, n: int, seed: int) -> torch.Tensor | None:
        """The (n, L) label sets a conditional prior is told: options.labels in turn, else drawn as in
        its training set (seeded); None for an unconditional prior (refused when labels are asked)."""
        vocabulary = loaded.vocabulary
        if not vocabulary:
            if options.labels:
                raise ConfigError(f"--label: {loaded.folder} is an unconditional prior (trained without "
                                  "data.labels); it takes no labels")
            return None
        if options.labels:
            index = {name: i for i, name in enumerate(vocabulary)}
            unknown = [name for labels in options.labels for name in labels if name not in index]
            if unknown:
                raise ConfigError(f"--label {unknown[0]!r} is not a label of {loaded.folder}; its labels: {vocabulary}")
            sets = torch.zeros(len(options.labels), len(vocabulary))
            for row, labels in enumerate(options.labels):
                sets[row, [index[name] for name in labels]] = 1
            return sets[torch.arange(n) % len(sets)]
        if options.label_distribution == "none":
            return torch.zeros(n, len(vocabulary))
        rows = torch.from_numpy(loaded.train_labels).float()
        return rows[torch.randint(len(rows), (n,), generator=torch.Generator().manual_seed(2 * seed + 1))]

    def has(self, model, prior_run=None) -> bool:
        folder = runs.run_of(model, self.name, prior_run)
        return folder is not None and runs.has_run(folder)

    def sampler(self, model, options: SampleOptions):
        folder = runs.run_of(model, self.name, options.prior_run)
        loaded = runs.load(model, self, next(model.parameters()).device, folder, required=True)
        self.draw_labels(loaded, options, 1, 0)  # refusals before any work
        options = with_steps(options, loaded.section.steps, getattr(loaded.section, "solver", None),
                             loaded.section.guidance)
        return LabelledDraw(self, loaded, options, self.draw(model, loaded.network, options))


class LabelledDraw:
    """draw(n, seed, labels=None) of a learned prior: told labels (label-name sets, in turn), or the
    options' labels, or labels drawn as its training set has them; `labels`: its vocabulary, the
    most frequent first."""

    def __init__(self, kind: LearnedPrior, loaded, options: SampleOptions, draw):
        self.kind, self.loaded, self.options, self.draw = kind, loaded, options, draw
        self.label_spec, self.guidance = loaded.label_spec, options.guidance if loaded.vocabulary else None
        counts = loaded.train_labels.sum(0) if loaded.vocabulary else []
        self.labels = [loaded.vocabulary[i] for i in np.argsort(-np.asarray(counts), kind="stable")]

    def __call__(self, n: int, seed: int, labels: tuple[tuple[str, ...], ...] | None = None) -> torch.Tensor:
        options = replace(self.options, labels=labels) if labels else self.options
        return self.draw(n, seed, self.kind.draw_labels(self.loaded, options, n, seed))


def refuse_stale_features(latents: Path, section: LearnedPriorConfig) -> None:
    """A prior that aligns (prior.align) needs its latents folder to hold the frozen network's features
    of today's recipe: one line when it holds none, or others (encode them again)."""
    manifest = rundir.read_json(latents / "manifest.json")
    if not getattr(section, "align", 0) or manifest is None:
        return
    stored, wanted = manifest.get("align_features"), RepresentationFeatures.record(ALIGN_GRID)
    if stored != wanted:
        said = "none" if stored is None else f"others ({stored})"
        raise ConfigError(f"prior.align: {latents} holds {said} of the features alignment needs ({wanted}): remove "
                          "it, and train-prior encodes the views again with them")


def prior_run_keys(values: dict) -> dict:
    """Overrides of a prior run with its train.* keys read as the prior's own (its recipe is its
    section's: train.time_limit is prior.time_limit), said in one line; a train key no prior has
    is refused."""
    train = values.pop("train", None) or {}
    if not train:
        return values
    names = {f.name for f in fields(LearnedPriorConfig)}
    unknown = sorted(set(train) - names)
    if unknown:
        raise ConfigError(f"train.{unknown[0]} is not a key of a prior's training; its keys are prior.*: "
                          f"{sorted(names - {'kind', 'after_training'})}")
    print(f"imgvae: a prior's training keys are prior.*: read {', '.join('train.' + k for k in train)} as "
          f"{', '.join('prior.' + k for k in train)}", file=sys.stderr)
    return merge_overrides({"prior": train}, values)


def train_prior(checkpoint: str | Path, out: str | Path | None = None, sources: list[str] | None = None,
                overrides: list[str] | dict | None = None, *, resume: bool = False, device: str = "auto",
                progress: bool = True, callbacks=()) -> dict:
    """Train the learned prior of a model (its EMA weights when kept) with the engine: a flow prior
    for a continuous latent, a token prior (MaskGIT) for a discrete one, into `out` (default:
    prior-flow/ or prior-tokens/ beside it). The training views of its data.train (or `sources`,
    one centre view each) are encoded once into out/latents, then prior.epochs are trained.
    Overrides: the model's data keys and the prior's (its recipe too: prior.time_limit, ...).
    resume: continue the run in `out`, with the overrides on top of its own keys. -> its summary
    (summary.json's, with "folder": `out`, which its paths are relative to)."""
    values = prior_run_keys(merge_overrides(overrides))
    asked = values.pop("prior", {})
    model, cfg, folder = open_for(checkpoint, sources, values, device)
    kind = learned_for(model.discrete)
    out = Path(out) if out else runs.default_run(model, kind.name)
    section = _section(kind, model, cfg, asked, out, resume, device)
    latents = out / "latents"
    refuse_stale_features(latents, section)
    if not (latents / "manifest.json").is_file():
        _encode_views(kind, model, cfg, section, sources, folder, latents, progress)
    where = "" if out == runs.default_run(model, kind.name) else f" -o {out}"
    resume_command, source = f"imgvae train-prior {checkpoint} --resume{where}", runs.source_of(model, cfg.model.name)

    def make_task(recipe: LearnedPriorConfig, procs: Processes) -> LatentTask:
        return kind.task(recipe, procs, latents, source, model.to(procs.device) if procs.main else None,
                         resume_command)

    summary = fit(make_task, section, out, resume=resume, progress=progress, callbacks=callbacks)
    summary = summary and {**summary, "folder": str(out)}  # where its recorded paths are relative to
    run = provenance_of(model).run
    if summary and run is not None:  # its samples beside the run's other pictures, for the report
        _pictures(model, kind, out, run, cfg, section.title)
    return summary


def _section(kind: LearnedPrior, model: VAE, cfg, asked: dict, out: Path, resume: bool, device: str):
    """The prior run's section: the run's own on resume (else the model's run's, if of this kind),
    the overrides on top; resolved for the model, refused before any work when it cannot be."""
    if "kind" in asked:
        refuse(asked["kind"], model.discrete, "train-prior")
        if asked["kind"] != kind.name:
            raise ConfigError(f"train-prior trains a learned prior ({kind.name} for this model); prior.kind="
                              f"{asked['kind']} is made by `imgvae fit-prior`")
    base = to_dict(cfg.prior) if cfg.prior.kind == kind.name else {}
    if resume:  # its own keys, under those given now (prior.epochs=N continues it)
        saved, section = runs.read_run(out)
        runs.refuse_other_weights(out, saved, model)
        base = to_dict(section)
    section = section_of(PriorConfig, base | asked | {"kind": kind.name, "after_training": False}, "prior.")
    return kind.resolve(replace(section, device=section.device if device == "auto" else device,
                                seed=cfg.train.seed if section.seed is None else section.seed), model)


def _encode_views(kind: LearnedPrior, model: VAE, cfg, section, sources, folder: Path, latents: Path,
                  progress: bool) -> None:
    """The training views (prior.view_epochs of them, mirrored too with data.hflip) encoded into the
    latents folder, with their labels (data.labels) and, for alignment, the frozen network's features."""
    specs = sources or cfg.data.train
    views = EpochViews(build_dataset(specs, cfg.data, train=True, seed=cfg.train.seed), section.view_epochs,
                       mirror=cfg.data.hflip)
    if len(views) < section.batch_size:  # refused before any latent is written
        raise RunError(f"{len(views)} training views are fewer than one batch (prior.batch_size="
                       f"{section.batch_size}): lower prior.batch_size")
    encode_dataset(model, views, latents, specs, folder, batch=cfg.eval_batch_size, num_workers=cfg.data.num_workers,
                   logvar=kind.logvar, progress=progress, model_cfg=cfg.model,
                   labels=read_labels(cfg.data.labels, views.source),
                   features=RepresentationFeatures() if getattr(section, "align", 0) else None)


def _pictures(model: VAE, kind: LearnedPrior, out: Path, run: Path, cfg, title: str) -> None:
    """Its samples of the final weights in the model's run's grids/ (the report shows them), and a
    conditional prior's most frequent labels, a row each."""
    n = cfg.eval.grid_size
    drawn = sampler(model, kind.name, SampleOptions(prior_run=out))
    save_grid(drawn(n * n, cfg.train.seed), n, run / rundir.GRIDS / rundir.prior_grid(title))
    if drawn.labels:
        rows = [(label, drawn(n, cfg.train.seed, ((label,),))) for label in drawn.labels[:LABEL_ROWS]]
        save_labelled_rows(rows, run / rundir.GRIDS / rundir.prior_grid(f"{title} by label"))
