"""What the engine trains, and how a caller watches it or injects faults.

A `Task` describes one model to train: its data, its model, its loss on a batch and what it
records each epoch. The VAE (train/vae.py) is one task; a second-stage model over latents is
another. The engine (train/engine.py) owns everything else: optimiser, precision, DDP,
checkpoints, resume, non-finite skipping, preemption, logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class Micro:
    """Where a micro-batch stands: optimiser step `step` (0-based, of `total_steps`), micro-batch
    `index` of `count` in that step."""

    step: int
    index: int
    count: int
    total_steps: int


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """The generator of optimiser step `step`'s random numbers. A task draws them for the step's
    global batch (batch_size x grad_accum x processes) and each process takes its rows
    (global_positions), so a run resumed mid-epoch, or split over N processes, draws the same."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def global_positions(procs, micro: Micro, batch_size: int, n: int) -> torch.Tensor:
    """Where this process's n examples of micro-batch `micro` sit in the step's global batch:
    DistributedSampler gives rank r the positions r, r + W, ..., so its micro-batch m holds
    r + W * (m * B + j)."""
    return procs.rank + procs.world_size * (micro.index * batch_size + torch.arange(n, device=procs.device))


class Batches(Protocol):
    """A task's training data as the engine reads it: a fixed number of batches per epoch, an
    epoch's order set by (epoch, batches already done) so that a resumed run repeats it."""

    per_epoch: int  # loader batches per epoch
    wait: float  # seconds spent waiting for batches this epoch

    def start_epoch(self, epoch: int, batches_done: int) -> str | None:
        """Set the epoch's order from batch `batches_done` on -> a line to print, or None."""

    def __iter__(self) -> Iterator[Any]:
        """The rest of the epoch's batches."""

    def __len__(self) -> int:
        """Batches left in the epoch."""

    def summary(self) -> dict:
        """What the run summary says about the data (files left out, ...)."""


class Task(Protocol):
    """A model the engine can train. Every method runs in every process unless it says rank 0."""

    name: str  # shown in the banner
    picture_columns: int  # columns of the per-epoch picture grids
    adversary: object | None  # a train.adversary.Adversary when a GAN term is on, else None
    epochs_key: str  # the config key that sets the run's epochs (named when a resume has none left)

    def config_dict(self) -> dict:
        """The run's whole config as plain values: config.yaml and every checkpoint hold it."""

    def batches(self) -> Batches:
        """The training data (built before the model: a missing source fails before any work)."""

    def build_model(self, fresh: bool) -> nn.Module:
        """The model on the training device, its trainable parameters marked; fresh: not resumed."""

    def inputs(self, batch: Any, micro: Micro) -> Any:
        """A loader batch -> what forward() takes, on the device (with its step's randomness)."""

    def batch_size(self, inputs: Any) -> int:
        """Examples in the inputs (statistics are means weighted by it)."""

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The forward pass, under the run's autocast."""

    def loss(self, inputs: Any, output: Any, micro: Micro) -> tuple[torch.Tensor, dict]:
        """(scalar loss in fp32, {name: scalar tensor} statistics) of one micro-batch."""

    def adversary_pair(self, inputs: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, fake) images for the adversary (only called when there is one)."""

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (frozen parts may stay in eval mode)."""

    def begin(self) -> None:
        """Rank 0, before the first step (e.g. fix the images every epoch's pictures show)."""

    def end_epoch(self, model: nn.Module, epoch: int) -> tuple[dict, dict]:
        """Rank 0, after each epoch, with the weights that make pictures (EMA when kept) ->
        (held-out statistics, {name: [0, 1] images} to show)."""

    def describe(self) -> str:
        """The banner's words about the data (sizes, caches)."""

    def summary(self, out) -> dict:
        """Rank 0: what the run summary adds for this task (files left out, where pictures are)."""

    def likely_keys(self) -> str:
        """The config keys (with their values) most likely behind a diverging run, for its message."""

    def resume_command(self, out) -> str:
        """The command that continues the run in `out`, as the messages print it."""


class Callback:
    """Hooks into the engine's loop. Tests inject faults with one (a NaN input, a crash after a
    checkpoint); tools watch with one. Every hook does nothing by default."""

    def on_inputs(self, inputs: Any, step: int) -> Any:
        """Each micro-batch's inputs before the forward pass -> the inputs to use."""
        return inputs

    def on_step_start(self, state) -> None:
        """Before an optimiser step's first forward pass."""

    def on_step_end(self, state) -> None:
        """After an optimiser step (applied or skipped), before it is logged or saved."""

    def before_checkpoint(self, name: str) -> None:
        """Before checkpoint `name` is written (every process)."""

    def on_checkpoint(self, name: str) -> None:
        """After checkpoint `name` was written (every process, after the barrier)."""


class Callbacks(Callback):
    """Several callbacks as one, called in order."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def on_inputs(self, inputs, step):
        for c in self.callbacks:
            inputs = c.on_inputs(inputs, step)
        return inputs

    def on_step_start(self, state) -> None:
        for c in self.callbacks:
            c.on_step_start(state)

    def on_step_end(self, state) -> None:
        for c in self.callbacks:
            c.on_step_end(state)

    def before_checkpoint(self, name: str) -> None:
        for c in self.callbacks:
            c.before_checkpoint(name)

    def on_checkpoint(self, name: str) -> None:
        for c in self.callbacks:
            c.on_checkpoint(name)
