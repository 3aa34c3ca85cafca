"""The train state: the model and everything that changes when it takes a step (DDP and
torch.compile wrappers, optimiser, scheduler, GradScaler, EMA, the adversary, the position),
one whole optimiser step at a time, and its `state_dict` for the checkpoint.

A step never waits for the device: its statistics, the non-finite check and the skip counts
stay there until `settle` reads them at a log point, a checkpoint or an epoch end.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from imgvae.config import TrainConfig
from imgvae.runtime import RunError
from imgvae.train.optim import build_optimizer, step_if, update_ema
from imgvae.train.precision import autocast, grad_scaler
from imgvae.train.processes import Processes, RunningMean
from imgvae.train.task import Callback, Micro, Task


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimiser steps taken
    batches_done: int = 0  # loader batches of the current epoch
    skipped_steps: int = 0  # steps with a non-finite loss or gradient, not applied
    bad_steps: int = 0  # such steps in a row (not saved: a resumed run starts afresh)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.batches_done, self.skipped_steps = state["batches_done"], state["skipped_steps"]


class TooManyBadSteps(RunError):
    """train.max_bad_steps non-finite steps in a row."""


class TrainState:
    """One model's training state on one process. `step` takes a whole optimiser step over
    its micro-batches; `state_dict` / `load_state_dict` are what a checkpoint saves and restores
    (with `modules`, the weights files)."""

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, procs: Processes, total_steps: int,
                 adversary=None):
        self.model, self.tc, self.procs, self.device = model, tc, procs, procs.device
        self.total_steps, self.adversary = total_steps, adversary
        self.optimizer = build_optimizer(model, tc)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=tc.lr_gamma)
        self.scaler = grad_scaler(self.device, tc.precision)
        # The averaged copy makes grids, evaluation and samples.
        self.ema = AveragedModel(model, self.device, use_buffers=True) if tc.ema > 0 else None
        self.position, self.epoch_stats = Position(), RunningMean()
        # Skipped steps counted on the device; Position takes them in at the sync points (settle).
        self.new_skips = self.bad_run = torch.zeros((), dtype=torch.long, device=self.device)
        self.train_model, self.ddp, self.params = model, None, []

    # -- checkpoints ---------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        """The weights a checkpoint holds, by file: model, and ema / discriminator when kept."""
        modules = {"model": self.model}
        if self.ema is not None:
            modules["ema"] = self.ema.module
        if self.adversary is not None:
            modules["discriminator"] = self.adversary.discriminator
        return modules

    def state_dict(self) -> dict:
        epoch_sums, epoch_images = self.epoch_stats.state()
        state = {**self.position.state_dict(), "epoch_sums": epoch_sums, "epoch_images": epoch_images,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict()}
        if self.ema is not None:
            state["ema_updates"] = int(self.ema.n_averaged)
        if self.adversary is not None:
            state |= self.adversary.state_dict()
        return state

    def load_state_dict(self, state: dict, load_weights) -> None:
        """Restore from a checkpoint's state; load_weights(module, file key) fills a module."""
        for key, module in self.modules().items():
            load_weights(module, key)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.position.load_state_dict(state)
        self.epoch_stats = RunningMean(state["epoch_sums"], state["epoch_images"])
        if self.ema is not None:
            self.ema.n_averaged.fill_(state["ema_updates"])
        if self.adversary is not None:
            self.adversary.load_state_dict(state)

    # -- wrappers ------------------------------------------------------------------
    def wrap(self) -> None:
        """train_model: what the step calls (DDP and torch.compile around the model)."""
        model = self.model
        if self.procs.distributed:
            if self.device.type == "cuda":  # BatchNorm statistics over the global batch (needs GPUs)
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        self.train_model = torch.compile(model, mode=self.tc.compile_mode) if self.tc.compile else model
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def eval_model(self) -> torch.nn.Module:
        """The weights that make pictures, evaluations and samples: the EMA when kept."""
        return self.ema.module if self.ema is not None else self.model

    # -- one optimiser step --------------------------------------------------------------
    def step(self, task: Task, micro_batches: list, callback: Callback) -> tuple[RunningMean, torch.Tensor] | None:
        """Forward, loss and backward of each micro-batch, then one optimiser step (skipped when
        the gradient is not finite) -> (the step's statistics, gradient norm), or None when no
        micro-batch could train (each needs two examples: BatchNorm)."""
        pos = self.position
        # BatchNorm statistics move in the forward pass: keep a copy to undo a skipped step.
        saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        gan = self.adversary is not None and self.adversary.active(pos.step)
        step_stats, finite = RunningMean(), torch.ones((), dtype=torch.bool, device=self.device)
        for index, batch in enumerate(micro_batches):
            if len(batch) < 2:
                continue
            micro = Micro(pos.step, index, len(micro_batches), self.total_steps)
            inputs = callback.on_inputs(task.inputs(batch, micro), pos.step)
            loss, stats = self._micro_step(task, inputs, micro, gan)
            finite &= torch.isfinite(loss)
            step_stats.add(stats, task.batch_size(inputs))
        if step_stats.count == 0:
            return None
        grad_norm, applied = self._apply(finite, saved_buffers)
        if gan:
            self.adversary.step()
        self.epoch_stats.merge(step_stats, keep=applied)  # statistics of skipped steps would be NaN
        return step_stats, grad_norm

    def _micro_step(self, task: Task, inputs, micro: Micro, gan: bool) -> tuple[torch.Tensor, dict]:
        """Forward (under autocast), loss in fp32 and its share 1 / count of the backward."""
        # Under DDP, gradients are all-reduced only in the step's last backward.
        sync = self.ddp.no_sync() if self.ddp is not None and micro.index + 1 < micro.count else nullcontext()
        with sync:
            with autocast(self.device, self.tc.precision):
                output = task.forward(self.train_model, inputs)
            loss, stats = task.loss(inputs, output, micro)
            if gan:
                real, fake = task.adversary_pair(inputs, output)
                term, gan_stats = self.adversary.generator_term(loss, fake, self.model.last_layer())
                loss = loss + term
                stats |= gan_stats | {"loss": loss.detach()}
            self.scaler.scale(loss / micro.count).backward()
        if gan:
            stats["discriminator"] = self.adversary.accumulate(real, fake, 1 / micro.count)
        return loss, stats

    def _apply(self, loss_finite: torch.Tensor, saved_buffers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip, and step unless the gradient norm is not finite (then skip, and put
        the buffers saved before the forward passes back) without waiting for a GPU (step_if);
        then the EMA update. -> (gradient norm, whether the step was applied) as device tensors."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        # Gradients are already averaged over processes, so every process takes the same decision.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        applied = torch.isfinite(grad_norm)
        step_if(self.optimizer, applied, lambda: self.scaler.step(self.optimizer))
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), saved_buffers):
                buffer.copy_(torch.where(applied, buffer, saved))
        if self.ema is not None:
            update_ema(self.ema, self.model, self.tc.ema, applied)
        # fp16 overflows with a finite loss are the GradScaler's business (it lowers the scale).
        counts = ~applied & ~(loss_finite & self.scaler.is_enabled())
        self.new_skips = self.new_skips + (~applied).long()
        self.bad_run = torch.where(applied, 0, self.bad_run + counts.long())
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.position.step += 1
        return grad_norm, applied

    def settle(self) -> None:
        """A sync point (log, checkpoint, epoch end): count the skipped steps; raise
        TooManyBadSteps after train.max_bad_steps non-finite steps in a row."""
        pos = self.position
        new_skips, pos.bad_steps = torch.stack([self.new_skips, self.bad_run]).tolist()
        pos.skipped_steps += new_skips
        self.new_skips = torch.zeros_like(self.new_skips)
        if pos.bad_steps >= self.tc.max_bad_steps:
            raise TooManyBadSteps(f"{pos.bad_steps} steps in a row had a non-finite loss or gradient (step {pos.step})")

    def end_epoch(self) -> tuple[dict, float]:
        """After the epoch's last step: its mean statistics over every process and the learning
        rate it trained at; the scheduler steps and the position moves to the next epoch."""
        pos = self.position
        train_stats = self.epoch_stats.means(self.procs)
        if not train_stats:
            raise RunError(f"epoch {pos.epoch + 1} had no readable training examples (or every step was skipped)")
        lr = self.scheduler.get_last_lr()[0]
        # A run resumed at an epoch's end steps no optimiser before this; its state was restored.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        pos.epoch, pos.batches_done, self.epoch_stats = pos.epoch + 1, 0, RunningMean()
        return train_stats, lr
