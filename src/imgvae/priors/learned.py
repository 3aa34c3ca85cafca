"""Learned priors: what the flow and token priors share. Each is a task of the training engine
over latents encoded once (an `imgvae encode` folder in PRIOR/latents, memory-mapped, kept resident
on the device), trained under its own prior section's recipe in a run folder of its own; the
engine brings checkpoints, resume, preemption, time limit, precision, compile, DDP, EMA, records."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from imgvae import rundir
from imgvae.config import ConfigError, LearnedPriorConfig, PriorConfig, merge_overrides, section_of, to_dict
from imgvae.data.datasets import EpochViews, build_dataset
from imgvae.data.labels import read_labels
from imgvae.io.latents import encode_dataset
from imgvae.io.paths import open_for, provenance_of
from imgvae.io.pictures import save_grid, save_labelled_rows
from imgvae.models.base import VAE
from imgvae.priors import runs
from imgvae.priors.condition import dropped
from imgvae.priors.registry import PriorKind, SampleOptions, learned_for, refuse, sampler, with_steps
from imgvae.priors.runs import latent_labels
from imgvae.runtime import RunError
from imgvae.train.engine import fit
from imgvae.train.processes import Processes
from imgvae.train.task import Micro, global_positions, step_generator

SAMPLES_SHOWN = 16  # the per-epoch picture: decoded samples of the prior being trained
LABEL_ROWS = 8  # a conditional prior's picture by label: its most frequent labels


@dataclass
class LatentBatch:
    """A batch of latent rows and, for a conditional prior, their multi-hot labels."""

    rows: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)


class LatentBatches:
    """Rows (N, ...) and their labels (N, L) resident on the device, in an order drawn per (seed,
    epoch); process r of W takes positions r, r + W, ... (as DistributedSampler)."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, procs: Processes,
                 labels: torch.Tensor | None = None):
        self.rows, self.batch_size, self.seed, self.procs, self.wait = rows, batch_size, seed, procs, 0.0
        self.labels = labels
        self.per_epoch = len(rows) // (batch_size * procs.world_size)
        if self.per_epoch == 0:
            raise RunError(f"{len(rows)} latents are fewer than one global batch (prior.batch_size={batch_size} x "
                           f"{procs.world_size} processes): lower prior.batch_size")

    def start_epoch(self, epoch: int, batches_done: int) -> None:
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        self.mine = order[self.procs.rank::self.procs.world_size].to(self.rows.device)
        self.done = batches_done

    def __len__(self) -> int:
        return self.per_epoch - self.done

    def __iter__(self):
        for b in range(self.done, self.per_epoch):
            at = self.mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield LatentBatch(self.rows[at], None if self.labels is None else self.labels[at])

    def summary(self) -> dict:
        return {"latents": len(self.rows)}


def resident(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows on the device when they fit in half its free memory (a CPU: they are in RAM anyway);
    else pinned, and each batch is copied there."""
    fits = device.type != "cuda" or rows.nbytes < torch.cuda.mem_get_info(device)[0] / 2
    return rows.to(device) if fits else rows.pin_memory()


class LatentTask:
    """What the learned priors' tasks share: the latents folder, the global batch's random numbers,
    the per-epoch picture of decoded samples, the records. Subclasses read their rows, build their
    model, draw their inputs, take their loss and draw samples."""

    adversary, epochs_key, kind = None, "prior.epochs", None

    def __init__(self, cfg: LearnedPriorConfig, procs: Processes, latents: Path, source: dict,
                 autoencoder: VAE | None = None, resume: str = "imgvae train-prior MODEL --resume"):
        self.cfg = self.tc = cfg  # the prior's section is also the engine's recipe
        self.procs, self.device = procs, procs.device
        self.latents, self.source, self.autoencoder = Path(latents), source, autoencoder
        self.picture_columns = int(math.sqrt(SAMPLES_SHOWN))
        self.valid = np.load(self.latents / "valid.npy")
        self.name, self.resume = cfg.title, resume
        self.vocabulary = latent_labels(self.latents)[0]

    def config_dict(self) -> dict:
        """The run's config.yaml: its section, the latents (relative to the run folder) and what they
        are of, and a conditional prior's label vocabulary."""
        return {"kind": self.cfg.kind, "source": self.source, "latents": self.latents.name,
                "latent_shape": list(self.latent_shape), "prior": to_dict(self.cfg),
                **({"labels": self.vocabulary} if self.vocabulary else {})}

    def generator(self, micro: Micro) -> torch.Generator:
        """The step's random numbers, drawn for the global batch from (seed, step): any process count."""
        return step_generator(self.tc.seed, micro.step, self.device)

    def positions(self, n: int, micro: Micro) -> torch.Tensor:
        """This process's rows of the global batch's random numbers."""
        return global_positions(self.procs, micro, self.tc.batch_size, n)

    @property
    def total(self) -> int:
        return self.tc.batch_size * self.tc.grad_accum * self.procs.world_size

    def batches(self) -> LatentBatches:
        self.rows = resident(self.read_rows(), self.device)
        labels = latent_labels(self.latents)[1]
        labels = None if labels is None else resident(torch.from_numpy(labels[self.valid]).float(), self.device)
        return LatentBatches(self.rows, self.tc.batch_size, self.tc.seed, self.procs, labels)

    def labels_of(self, batch: LatentBatch, generator: torch.Generator, micro: Micro) -> torch.Tensor | None:
        """The batch's labels with prior.label_dropout of them emptied (drawn for the global batch,
        after the step's other draws, so that an unconditional prior draws what it always drew)."""
        if batch.labels is None:
            return None
        keep = torch.rand(self.total, generator=generator, device=self.device) >= self.cfg.label_dropout
        return dropped(batch.labels.to(self.device, non_blocking=True), keep[self.positions(len(batch), micro)])

    def batch_size(self, inputs: dict) -> int:
        return len(next(iter(inputs.values())))

    def adversary_pair(self, inputs, output):
        raise NotImplementedError  # a prior has no adversary

    def train_mode(self, model) -> None:
        model.train()

    def loss(self, inputs: dict, output: torch.Tensor, micro: Micro) -> tuple[torch.Tensor, dict]:
        loss = output.float()
        return loss, {"loss": loss.detach()}

    def begin(self) -> None:
        """Rank 0, before the first step."""

    def shown_labels(self) -> torch.Tensor | None:
        """The per-epoch picture's label sets: a conditional prior's labels in turn, one per sample."""
        if not self.vocabulary:
            return None
        return torch.eye(len(self.vocabulary), device=self.device)[torch.arange(SAMPLES_SHOWN) % len(self.vocabulary)]

    def end_epoch(self, model, epoch: int) -> tuple[dict, dict]:
        """Every tenth of the run (and at its end): its samples, decoded."""
        every = max(1, self.tc.epochs // 10)
        if self.autoencoder is None or (epoch % every and epoch != self.tc.epochs):
            return {}, {}
        model.eval()
        images = self.draw(model)
        model.train()
        return {}, {"samples": images}

    def describe(self) -> str:
        return (f"{len(self.rows):,} latents of shape {self.latent_shape} from {self.source['path']}; "
                f"{self.cfg.backbone} backbone")

    def summary(self, out: Path) -> dict:
        return {"kind": self.cfg.kind, "latents": len(self.rows), "source": self.source}

    def resume_command(self, out) -> str:
        return self.resume

    def likely_keys(self) -> str:
        return f"prior.lr={self.cfg.lr:g}, prior.batch_size={self.cfg.batch_size}, prior.width={self.cfg.width}"


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
    if "kind" in asked:
        refuse(asked["kind"], model.discrete, "train-prior")
        if asked["kind"] != kind.name:
            raise ConfigError(f"train-prior trains a learned prior ({kind.name} for this model); prior.kind="
                              f"{asked['kind']} is made by `imgvae fit-prior`")
    out = Path(out) if out else runs.default_run(model, kind.name)
    source = runs.source_of(model, cfg.model.name)
    base = to_dict(cfg.prior) if cfg.prior.kind == kind.name else {}
    if resume:  # its own keys, under those given now (prior.epochs=N continues it)
        saved, section = runs.read_run(out)
        runs.refuse_other_weights(out, saved, model)
        base = to_dict(section)
    section = section_of(PriorConfig, base | asked | {"kind": kind.name, "after_training": False}, "prior.")
    section = kind.resolve(replace(section, device=section.device if device == "auto" else device,
                                   seed=cfg.train.seed if section.seed is None else section.seed), model)
    latents = out / "latents"
    if not (latents / "manifest.json").is_file():
        specs = sources or cfg.data.train
        views = EpochViews(build_dataset(specs, cfg.data, train=True, seed=cfg.train.seed), section.view_epochs,
                           mirror=cfg.data.hflip)
        if len(views) < section.batch_size:  # refused before any latent is written
            raise RunError(f"{len(views)} training views are fewer than one batch (prior.batch_size="
                           f"{section.batch_size}): lower prior.batch_size")
        encode_dataset(model, views, latents, specs, folder, batch=cfg.eval_batch_size,
                       num_workers=cfg.data.num_workers, logvar=kind.logvar, progress=progress, model_cfg=cfg.model,
                       labels=read_labels(cfg.data.labels, views.source))

    where = "" if out == runs.default_run(model, kind.name) else f" -o {out}"
    resume_command = f"imgvae train-prior {checkpoint} --resume{where}"

    def make_task(recipe: LearnedPriorConfig, procs: Processes) -> LatentTask:
        return kind.task(recipe, procs, latents, source, model.to(procs.device) if procs.main else None,
                         resume_command)

    summary = fit(make_task, section, out, resume=resume, progress=progress, callbacks=callbacks)
    summary = summary and {**summary, "folder": str(out)}  # where its recorded paths are relative to
    run = provenance_of(model).run
    if summary and run is not None:  # its samples beside the run's other pictures, for the report
        n = cfg.eval.grid_size
        drawn = sampler(model, kind.name, SampleOptions(prior_run=out))
        save_grid(drawn(n * n, cfg.train.seed), n, run / rundir.GRIDS / rundir.prior_grid(section.title))
        if drawn.labels:  # a row per label, the most frequent first
            rows = [(label, drawn(n, cfg.train.seed, ((label,),))) for label in drawn.labels[:LABEL_ROWS]]
            save_labelled_rows(rows, run / rundir.GRIDS / rundir.prior_grid(f"{section.title} by label"))
    return summary
