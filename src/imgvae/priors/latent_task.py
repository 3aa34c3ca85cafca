"""What the learned priors' training tasks share: the latents folder's rows (and a conditional
prior's labels, an aligned prior's features) resident on the device, batched in a resumable order,
the global batch's random numbers, the per-epoch picture of decoded samples, the records. The
engine (train/) does the rest."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgvae.config import LearnedPriorConfig, to_dict
from imgvae.models.base import VAE
from imgvae.priors.condition import dropped
from imgvae.priors.runs import latent_labels
from imgvae.runtime import RunError
from imgvae.train.processes import Processes
from imgvae.train.task import Micro, global_positions, step_generator

SAMPLES_SHOWN = 16  # the per-epoch picture: decoded samples of the prior being trained


@dataclass
class LatentBatch:
    """A batch of latent rows and, for a conditional prior, their multi-hot labels."""

    rows: torch.Tensor
    labels: torch.Tensor | None = None
    features: torch.Tensor | None = None  # a frozen network's features of their images (REPA)

    def __len__(self) -> int:
        return len(self.rows)


class LatentBatches:
    """Rows (N, ...) and their labels (N, L) resident on the device, in an order drawn per (seed,
    epoch); process r of W takes positions r, r + W, ... (as DistributedSampler)."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, procs: Processes,
                 labels: torch.Tensor | None = None, features: torch.Tensor | None = None):
        self.rows, self.batch_size, self.seed, self.procs, self.wait = rows, batch_size, seed, procs, 0.0
        self.labels, self.features = labels, features
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
            yield LatentBatch(self.rows[at], *(None if x is None else x[at] for x in (self.labels, self.features)))

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
        features = None
        if getattr(self.cfg, "align", 0):  # REPA's targets, float16 on the device until used
            stored = np.load(self.latents / "align_features.npy", mmap_mode="r")
            features = resident(torch.from_numpy(np.asarray(stored[self.valid])), self.device)
        return LatentBatches(self.rows, self.tc.batch_size, self.tc.seed, self.procs, labels, features)

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

    def loss(self, inputs: dict, output: torch.Tensor | dict, micro: Micro) -> tuple[torch.Tensor, dict]:
        """The task's loss (a scalar, or a dict of it and its parts), with its statistics."""
        parts = output if isinstance(output, dict) else {"loss": output}
        return parts["loss"].float(), {k: v.detach().float() for k, v in parts.items()}

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
