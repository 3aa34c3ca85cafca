"""The training loop: epochs of optimiser steps, each step `train.grad_accum` micro-batches
through `training_step`; eval loss, picture grids, TensorBoard, history and atomic
checkpoints; one process or many under torchrun (DDP). AMP and DDP live here only.

Every random choice of a step (flips, reparametrisation noise) is drawn for the
global batch from (seed, step, micro-batch) and each process takes its rows, so a
run resumed mid-epoch, or split over N processes, repeats the same computation.
"""

from __future__ import annotations

import fcntl
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from . import checkpoint as ckpt
from . import rundir
from .adversarial import Adversary
from .config import Config, ConfigError, TrainConfig, to_dict
from .datasets import (
    BadFiles,
    DeviceBatches,
    Prefetched,
    build_dataset,
    eval_loader,
    first_images,
    loader_workers,
    make_loader,
    resident_images,
)
from .decode import normalize, to_model_input
from .evaluate import eval_loss
from .features import PerceptualDistance
from .losses import kl_weight, vae_loss
from .models import VAE, build_vae, check_model
from .optim import build_optimizer, step_if, update_ema
from .prior import check_size
from .runlog import RunLog
from .runtime import (
    Processes,
    RunError,
    RunningMean,
    Stopped,
    StopSignals,
    allow_tf32,
    autocast,
    grad_scaler,
    keep_freed_memory,
    run_precision,
    start_processes,
    stop_processes,
)
from .sample import decode, prior_noise, reconstruct


def step_randomness(cfg: TrainConfig, step: int, micro: int, n: int, latent_shape, procs: Processes):
    """(flip mask (n,), reparametrisation noise (n, *latent_shape)) for this process's
    n images in micro-batch `micro` of optimiser step `step`.

    Draws are made for the step's global batch (batch_size x grad_accum x processes)
    and indexed by global position: DistributedSampler gives rank r the epoch
    positions r, r + W, ..., so its micro-batch m holds r + W * (m * B + j). One
    process with a W * A times larger batch therefore draws the same values.
    They are drawn on the training device (a copy from pageable host memory would make
    the host wait for the GPU every step), so CUDA runs draw other values than CPU runs.
    """
    device = procs.device
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
    total = cfg.batch_size * cfg.grad_accum * procs.world_size
    flips = torch.rand(total, generator=generator, device=device) < 0.5
    noise = torch.randn(total, *latent_shape, generator=generator, device=device)
    positions = procs.rank + procs.world_size * (micro * cfg.batch_size + torch.arange(n, device=device))
    return flips[positions], noise[positions]


def lock_run(out: Path):
    """Hold out/.lock for the life of the run: a second run on the same folder fails."""
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"another imgvae run is writing to {out} (lock file {out / '.lock'})") from None
    return handle


def train(cfg: Config, out_dir: str | Path, log_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Train cfg's model; write checkpoints, grids, history and TensorBoard logs.

    out_dir: results folder (config.yaml, checkpoints/, grids/, history.jsonl, steps.jsonl,
    summary.json). log_dir: TensorBoard folder (default out_dir/logs).
    resume: continue the run in out_dir from its newest checkpoint (mid-epoch ones too).
    Under torchrun every process calls this; only rank 0 writes, and returns the run
    summary (also written to out_dir/summary.json); the others return {}.
    workflow.train_and_evaluate adds the prior, the evaluation and the report.
    """
    cfg = checked_config(cfg, resume)
    procs = start_processes(cfg.train.device, cfg.train.dist_backend)
    # config.yaml records the precision the run trains in.
    cfg = replace(cfg, train=replace(cfg.train, precision=run_precision(cfg.train.precision, procs.device)))
    out = Path(out_dir)
    lock = None
    try:
        if procs.main:
            out.mkdir(parents=True, exist_ok=True)
            lock = lock_run(out)
        with StopSignals() as signals:
            trainer = Trainer(cfg, out, log_dir, resume, progress, procs, signals)
            try:
                return trainer.run()
            except (OSError, ckpt.CheckpointError) as e:  # a full disk, a read-only or vanished folder
                what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
                raise RunError(f"stopped, {what}; the last good checkpoint is {trainer.last_checkpoint()}: make room "
                               f"or fix the folder, then continue with imgvae train --resume {out}") from None
    finally:
        if lock is not None:
            lock.close()
        stop_processes(procs)


def checked_config(cfg: Config, resume: bool) -> Config:
    """cfg as the run will use it (a pretrained diffusers folder sets the architecture), refused
    before any data is read when it cannot work: a model the config cannot build, a prior too
    large to fit, a missing FID weights file."""
    if cfg.model.pretrained and not resume:
        cfg = ckpt.with_pretrained_architecture(cfg)
    latent_shape = check_model(cfg)
    if cfg.prior.after_training:
        check_size(cfg.prior.components, math.prod(latent_shape))
    for key in ("fid_weights", "lpips_weights"):
        path = getattr(cfg.eval, key)
        if cfg.eval.after_training and path and not Path(path).is_file():
            raise ConfigError(f"eval.{key}: no such file {path!r}")
    return cfg


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimiser steps taken
    batches_done: int = 0  # loader batches of the current epoch
    skipped_steps: int = 0  # steps with a non-finite loss or gradient, not applied
    bad_steps: int = 0  # such steps in a row (not saved: a resumed run starts afresh)


class Trainer:
    """One run's state. `run` is the loop, read top to bottom; tests and tools change its
    behaviour at the named points model_input, log_step, stop_reason, save_checkpoint
    and end_epoch."""

    def __init__(self, cfg: Config, out: Path, log_dir, resume: bool, progress: bool, procs: Processes,
                 signals: StopSignals | None = None):
        self.cfg, self.out, self.procs, self.progress = cfg, out, procs, progress and procs.main
        self.signals = signals
        if not resume and (out / rundir.CHECKPOINTS).exists():
            raise RunError(f"{out} already holds a run; continue it with --resume {out}, or choose another -o")
        weights, state = None, None
        if resume and (out / rundir.CHECKPOINTS / ckpt.LAST).exists():
            weights, state = ckpt.load_checkpoint(out)
        elif resume:  # stopped before its first checkpoint: nothing to lose by starting over
            self.say(f"imgvae: {out} has no checkpoint yet; starting it from the beginning")
        self.logs = Path(log_dir or (state and state["log_dir"]) or out / rundir.LOGS)
        self.ckpt_dir, self.grid_dir = out / rundir.CHECKPOINTS, out / rundir.GRIDS
        self.device = procs.device
        if self.device.type == "cpu" and cfg.train.keep_freed_memory:
            keep_freed_memory()
        if self.device.type == "cuda":
            allow_tf32(cfg.train.tf32)
        torch.manual_seed(cfg.train.seed)
        self._build_data()
        self._build_model(fresh=state is None)
        self.position, self.epoch_stats = Position(), RunningMean()
        # Skipped steps counted on the device; Position takes them in at the sync points (settle).
        self.new_skips = self.bad_run = torch.zeros((), dtype=torch.long, device=self.device)
        if state is not None:
            self._restore(weights, state)
        self._wrap_model()

    def _build_data(self) -> None:
        cfg, procs = self.cfg, self.procs
        tc = cfg.train
        self.train_set = build_dataset(cfg.data.train, cfg.data, train=True, seed=tc.seed)
        self.eval_set = build_dataset(cfg.data.eval, cfg.data, train=False, seed=tc.seed) if cfg.data.eval else None
        if len(self.train_set) < tc.batch_size * procs.world_size:
            raise RunError(f"the training set has {len(self.train_set)} images, fewer than one global batch "
                           f"(train.batch_size={tc.batch_size} x {procs.world_size} processes)")
        workers = loader_workers(self.train_set, cfg.data.num_workers, self.device)
        # RAM for views and decoded images, per split. The budget is per machine: torchrun's
        # processes on it keep a copy each.
        self.memory_budget = cfg.data.memory_cache_gb * 2**30 / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.in_memory = self.train_set.keep_in_memory(self.memory_budget, shared=workers > 0)
        self.train_set.keep_decoded(self.memory_budget, processes=workers)
        self.loader, self.sampler = make_loader(self.train_set, tc.batch_size, True, tc.seed, workers,
                                                self.device.type == "cuda", procs.rank, procs.world_size)
        self.resident = resident_images(self.train_set, self.device, self.device_budget())
        if self.resident is not None:
            self.loader = DeviceBatches(self.resident, self.sampler, tc.batch_size, self.train_set.views)
        else:  # on CUDA, the next batch is copied while this step runs
            self.loader = Prefetched(self.loader, self.device)
        self.batches_per_epoch = len(self.sampler.base) // tc.batch_size
        self.eval_loader = None
        if self.eval_set is not None and procs.main:
            workers = loader_workers(self.eval_set, cfg.data.num_workers, self.device)
            self.eval_set.keep_in_memory(self.memory_budget, shared=workers > 0)
            count = min(cfg.data.eval_limit or len(self.eval_set), len(self.eval_set))
            self.eval_loader = eval_loader(self.eval_set, tc.batch_size, self.device, workers, list(range(count)))

    def device_budget(self) -> float:
        """Bytes of the training device this process may fill with the training set (data.device_cache_gb)."""
        cfg = self.cfg.data
        if cfg.device_cache_gb != "auto":
            return cfg.device_cache_gb * 2**30
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] / 2
        return self.memory_budget  # it stays in RAM

    def _build_model(self, fresh: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self.model = build_vae(cfg)
        if fresh and cfg.model.pretrained:
            ckpt.init_from(self.model, cfg.model.pretrained)
        self.model.to(self.device)
        if tc.freeze_encoder:
            for module in self.model.encoder_modules():
                module.requires_grad_(False)
        if tc.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=tc.lr_gamma)
        self.scaler = grad_scaler(self.device, tc.precision)
        self.ema = None
        if tc.ema > 0:  # the averaged copy makes grids, evaluation and samples
            self.ema = AveragedModel(self.model, self.device, use_buffers=True)
        self.perceptual = PerceptualDistance().to(self.device) if cfg.loss.perceptual > 0 else None
        self.adversary = None
        if cfg.loss.adversarial > 0:
            self.adversary = Adversary(cfg.loss, tc.precision, self.device, self.procs.world_size)
        self.total_steps = tc.epochs * math.ceil(self.batches_per_epoch / tc.grad_accum)

    def _restore(self, weights: dict, state: dict) -> None:
        ckpt.load_weights(self.model, {k: v.to(self.device) for k, v in weights.items()}, self.out)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = Position(state["epoch"], state["step"], state["batches_done"], state["skipped_steps"])
        self.epoch_stats = RunningMean(state["epoch_sums"], state["epoch_images"])
        if self.ema is not None:
            ckpt.load_weights(self.ema.module, ckpt.load_extra(self.out, "ema", self.device), self.out)
            self.ema.n_averaged.fill_(state["ema_updates"])
        if self.adversary is not None:
            discriminator = ckpt.load_extra(self.out, "discriminator", self.device)
            ckpt.load_weights(self.adversary.discriminator, discriminator, self.out)
            self.adversary.optimizer.load_state_dict(state["d_optimizer"])

    def _wrap_model(self) -> None:
        """self.train_model: what the step calls (DDP and torch.compile around self.model)."""
        model, self.ddp = self.model, None
        if self.procs.distributed:
            if self.device.type == "cuda":  # BatchNorm statistics over the global batch (needs GPUs)
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        tc = self.cfg.train
        self.train_model = torch.compile(model, mode=tc.compile_mode) if tc.compile else model
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # -- the loop ---------------------------------------------------------------
    def run(self) -> dict:
        """Train up to train.epochs (or train.time_limit) -> the run summary."""
        tc, pos = self.cfg.train, self.position
        self.begin()
        while pos.epoch < tc.epochs and not self.stopped:
            self.begin_epoch()
            for micro_batches in self.steps_of_epoch():
                # BatchNorm statistics move in the forward pass: keep a copy to undo a skipped step.
                saved_buffers = [b.detach().clone() for b in self.model.buffers()]
                gan = self.adversary is not None and self.adversary.active(pos.step)
                step_stats, finite = RunningMean(), torch.ones((), dtype=torch.bool, device=self.device)
                for micro, images in enumerate(micro_batches):
                    if len(images) < 2:  # BatchNorm needs two samples to train
                        continue
                    loss, stats = self.training_step(images, micro, len(micro_batches), gan)
                    finite &= torch.isfinite(loss)
                    step_stats.add(stats, len(images))
                if step_stats.count == 0:
                    continue
                grad_norm, applied = self.optimizer_step(finite, saved_buffers)
                if gan:
                    self.adversary.step()
                self.epoch_stats.merge(step_stats, keep=applied)  # statistics of skipped steps would be NaN
                self.epoch_images += step_stats.count
                self.after_step(step_stats, grad_norm)
            self.bar.close()
            self.images_seen += self.epoch_images
            # Stopped mid-epoch, or by a signal: a resume ends the epoch (a preempted job must exit fast).
            if pos.batches_done == self.batches_per_epoch and self.stopped in (None, "time limit"):
                self.end_epoch(time.time() - self.epoch_start)
        if self.log is not None:
            self.log.close()
        self.settle()
        summary = self.summary()
        if self.stopped == "time limit":
            self.say(f"imgvae: train.time_limit of {tc.time_limit} min reached at step {pos.step}; "
                     f"continue with --resume {self.out}")
        elif self.stopped:
            raise Stopped(f"stopped by {self.stopped} at step {pos.step}, checkpoint {self.last_checkpoint()}; "
                          f"continue with imgvae train --resume {self.out}", signal.Signals[self.stopped])
        return summary

    def begin_epoch(self) -> None:
        """Before the epoch's first step: the epoch's order, and the training views on the
        device once the RAM view cache holds them all (after the first epoch)."""
        pos = self.position
        self.sampler.set_epoch(pos.epoch, start=pos.batches_done * self.cfg.train.batch_size)
        self.train_set.set_epoch(pos.epoch)
        if self.resident is None:
            self.use_resident_views()
        self.training_mode()
        self.epoch_start, self.epoch_images, self.data_wait = time.time(), 0, 0.0

    def use_resident_views(self) -> None:
        """Batch on the device from the RAM view cache, as from a prepared cache, once it holds
        every training view (unreadable ones left out) and they fit data.device_cache_gb."""
        held = self.train_set.views_in_memory(fill=self.cfg.train.batch_size * self.procs.world_size)
        if held is None or held[0].numel() > self.device_budget():
            return
        self.resident = held[0].to(self.device)  # on a CPU, the very same tensor
        self.loader = DeviceBatches(self.resident, self.sampler, self.cfg.train.batch_size, readable=held[1])
        self.say(f"imgvae: every training view is in memory; batching them on {self.device} from now on")

    def steps_of_epoch(self):
        """The rest of the current epoch as optimiser steps: lists of up to grad_accum
        micro-batches (uint8 images), in loader order (the epoch's last step may be short).
        Time spent waiting for batches is summed in self.data_wait."""
        pos, accum = self.position, self.cfg.train.grad_accum
        self.bar = tqdm(self.loader, desc=f"epoch {pos.epoch + 1}/{self.cfg.train.epochs}", disable=not self.progress,
                        dynamic_ncols=True, initial=pos.batches_done, total=pos.batches_done + len(self.loader))
        micro_batches, asked = [], time.perf_counter()
        for images, _, bad_items in self.bar:
            self.data_wait += time.perf_counter() - asked
            self.bad_files.add(self.train_set, bad_items)
            pos.batches_done += 1
            micro_batches.append(images)
            if len(micro_batches) == accum or pos.batches_done == self.batches_per_epoch:
                yield micro_batches
                micro_batches = []
                if self.stopped:
                    return
            asked = time.perf_counter()

    def training_step(self, images: torch.Tensor, micro: int, n_micro: int, gan: bool):
        """Micro-batch `micro` of the step: forward (under autocast), loss in fp32, and its
        share 1 / n_micro of the backward. -> (loss, stats)."""
        cfg, pos = self.cfg, self.position
        flips, noise = step_randomness(cfg.train, pos.step, micro, len(images), self.model.latent_shape, self.procs)
        x = self.model_input(images, flips if cfg.data.hflip else None)
        # Under DDP, gradients are all-reduced only in the step's last backward.
        sync = self.ddp.no_sync() if self.ddp is not None and micro + 1 < n_micro else nullcontext()
        with sync:
            with autocast(self.device, cfg.train.precision):
                out = self.train_model(x, noise=noise)
            out = out.float()
            loss, stats = vae_loss(x, out, cfg.loss, kl_weight(cfg.loss, pos.step, self.total_steps), self.perceptual)
            if gan:
                term, gan_stats = self.adversary.generator_term(loss, out.x_hat, self.model.last_layer())
                loss = loss + term
                stats |= gan_stats | {"loss": loss.detach()}
            self.scaler.scale(loss / n_micro).backward()
        if gan:
            stats["discriminator"] = self.adversary.accumulate(x, out.x_hat, 1 / n_micro)
        return loss, stats

    def training_mode(self) -> None:
        self.train_model.train()
        if self.cfg.train.freeze_encoder:  # a frozen encoder's BatchNorm statistics stay as they were too
            for module in self.model.encoder_modules():
                module.eval()

    def model_input(self, images: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """uint8 micro-batch -> normalised, flipped model input on the device."""
        x = to_model_input(images, self.device, flips)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    def optimizer_step(self, loss_finite: torch.Tensor, saved_buffers: list[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip, and step unless the gradient norm is not finite (then skip, and put
        the buffers saved before the forward passes back) without waiting for a GPU (step_if);
        then the EMA update.
        -> (gradient norm, whether the step was applied) as device tensors."""
        tc = self.cfg.train
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        # Gradients are already averaged over processes, so every process takes the same decision.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        applied = torch.isfinite(grad_norm)
        step_if(self.optimizer, applied, lambda: self.scaler.step(self.optimizer))
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), saved_buffers):
                buffer.copy_(torch.where(applied, buffer, saved))
        if self.ema is not None:
            update_ema(self.ema, self.model, tc.ema, applied)
        # fp16 overflows with a finite loss are the GradScaler's business (it lowers the scale).
        counts = ~applied & ~(loss_finite & self.scaler.is_enabled())
        self.new_skips = self.new_skips + (~applied).long()
        self.bad_run = torch.where(applied, 0, self.bad_run + counts.long())
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.position.step += 1
        return grad_norm, applied

    def settle(self) -> None:
        """A sync point (log, checkpoint, epoch end): count the skipped steps, and stop after
        train.max_bad_steps non-finite steps in a row."""
        pos, tc = self.position, self.cfg.train
        new_skips, pos.bad_steps = torch.stack([self.new_skips, self.bad_run]).tolist()
        pos.skipped_steps += new_skips
        self.new_skips = torch.zeros_like(self.new_skips)
        if pos.bad_steps >= tc.max_bad_steps:
            raise RunError(f"{pos.bad_steps} steps in a row had a non-finite loss or gradient "
                           f"(step {pos.step}); stopped, last good checkpoint kept: {self.last_checkpoint()}. "
                           "Try a lower train.lr or train.grad_clip")

    def after_step(self, step_stats: RunningMean, grad_norm: torch.Tensor) -> None:
        """The step boundary: log, check the time limit and stop signals, checkpoint. The host
        waits for the device only when it logs or saves."""
        tc, pos = self.cfg.train, self.position
        if pos.step % tc.log_every == 0:
            self.settle()
            self.log_step(step_stats.means(self.procs) | {"grad_norm": grad_norm.item()})
        self.stopped = self.stop_reason()
        if self.stopped or (tc.ckpt_every_steps and pos.step % tc.ckpt_every_steps == 0):
            self.save_checkpoint(f"step_{pos.step:08d}")

    # -- named points -----------------------------------------------------------
    def begin(self) -> None:
        """Before the first step: the run's records (rank 0), the grids' fixed images and
        noise, the banner."""
        cfg, procs, pos = self.cfg, self.procs, self.position
        self.log, self.fixed_images, self.stopped = None, None, None
        if procs.main:
            self.log = RunLog(self.out, self.logs, cfg, pos.epoch, pos.step)
            shown = self.eval_set if self.eval_set is not None else self.train_set
            self.fixed_images = first_images(shown, cfg.eval.grid_size**2)
        self.fixed_noise = prior_noise(self.model, cfg.eval.grid_size**2, seed=cfg.train.seed)
        self.bad_files, self.started, self.images_seen = BadFiles(), time.time(), 0
        self.n_params = sum(p.numel() for p in self.model.parameters())
        n_eval = len(self.eval_loader.dataset) if self.eval_loader else 0
        self.say(f"imgvae: model {cfg.model.name} ({self.n_params:,} parameters) on {self.device}"
                 f"{f' x {procs.world_size} processes' if procs.distributed else ''} in {cfg.train.precision}; "
                 f"train {len(self.train_set):,} "
                 f"images from {self.train_set.source.name}; eval {n_eval:,}; "
                 f"epochs {pos.epoch + 1}..{cfg.train.epochs}"
                 f"{'; training views kept in RAM once decoded' if self.in_memory else ''}"
                 f"{'; training images kept decoded in RAM' if self.train_set.decoded is not None else ''}"
                 f"{f'; training set resident on {self.device}' if self.resident is not None else ''}")
        if pos.epoch >= cfg.train.epochs:
            self.say(f"imgvae: {self.out} already finished {pos.epoch} epochs; raise train.epochs to continue")

    def log_step(self, values: dict[str, float]) -> None:
        """Every train.log_every steps: the global batch's means to steps.jsonl, TensorBoard, the bar."""
        pos = self.position
        if self.log is None:
            return
        self.log.step(pos.step, pos.epoch + pos.batches_done / self.batches_per_epoch, values)
        rate = self.epoch_images * self.procs.world_size / max(time.time() - self.epoch_start, 1e-9)
        self.bar.set_postfix(loss=f"{values['loss']:.1f}", kl=f"{values['kl']:.1f}", img_s=f"{rate:.0f}")

    def stop_reason(self) -> str | None:
        """"time limit" when train.time_limit has passed, a signal's name (SIGTERM) when one
        asked the run to stop, else None; every process gets the same answer. Under torchrun the
        processes agree at log points and epoch ends only, where the host waits for them anyway."""
        tc, pos = self.cfg.train, self.position
        late = bool(tc.time_limit) and time.time() - self.started > 60 * tc.time_limit
        signum = self.signals.received if self.signals is not None else None
        if self.procs.distributed:  # rank clocks differ, and a signal may reach one rank first: agree
            if pos.step % tc.log_every and pos.batches_done != self.batches_per_epoch:
                return None
            votes = self.procs.all_reduce_max(torch.tensor([float(late), float(signum or 0)]))
            late, signum = bool(votes[0]), int(votes[1])
        if signum:
            return signal.Signals(signum).name
        return "time limit" if late else None

    def end_epoch(self, seconds: float) -> None:
        """After the epoch's last step: history, eval loss, grids, learning-rate step, checkpoint."""
        pos = self.position
        self.settle()
        train_stats = self.epoch_stats.means(self.procs)
        if not train_stats:
            raise RunError(f"epoch {pos.epoch + 1} had no readable training images (or every step was skipped)")
        lr = self.scheduler.get_last_lr()[0]
        # A run resumed at an epoch's end steps no optimiser before this; its state was restored.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        pos.epoch, pos.batches_done, self.epoch_stats = pos.epoch + 1, 0, RunningMean()
        if self.procs.main:
            self._record_epoch(train_stats, lr, seconds)
        self.save_checkpoint(f"epoch_{pos.epoch:03d}")

    def _record_epoch(self, train_stats: dict, lr: float, seconds: float) -> None:
        """Rank 0: eval loss, the seed's three pictures, history.jsonl, TensorBoard, a line."""
        epoch, model, n = self.position.epoch, self.eval_model(), self.cfg.eval.grid_size
        eval_stats = {}
        if self.eval_loader is not None:
            eval_stats = eval_loss(model, self.eval_loader, self.eval_set, self.cfg.loss, self.device, self.bad_files)
        pictures = (self.fixed_images.float() / 255, reconstruct(model, normalize(self.fixed_images)),
                    decode(model, self.fixed_noise))
        self.log.pictures(epoch, dict(zip(rundir.GRID_KINDS, pictures)), n)
        rate = self.epoch_images * self.procs.world_size / seconds
        self.log.epoch({"epoch": epoch, "step": self.position.step, "lr": lr, "seconds": seconds, "img_per_s": rate,
                        "data_wait": self.data_wait / seconds,
                        "skipped_steps": self.position.skipped_steps,
                        **{f"train/{k}": v for k, v in train_stats.items()},
                        **{f"eval/{k}": v for k, v in eval_stats.items()}})
        msg = (f"epoch {epoch}: train loss {train_stats['loss']:.2f} (recon {train_stats['recon']:.2f}, "
               f"kl {train_stats['kl']:.2f})")
        if eval_stats:
            msg += f", eval loss {eval_stats['loss']:.2f}"
        if self.position.skipped_steps:
            msg += f", {self.position.skipped_steps} non-finite steps skipped so far"
        print(msg + f", {rate:.1f} img/s")

    def save_checkpoint(self, name: str) -> None:
        """Rank 0 writes everything needed to resume from exactly here; the others wait."""
        pos = self.position
        self.settle()
        epoch_sums, epoch_images = self.epoch_stats.state()
        if self.procs.main:
            state = {
                "epoch": pos.epoch, "step": pos.step, "batches_done": pos.batches_done,
                "epoch_sums": epoch_sums, "epoch_images": epoch_images,
                "skipped_steps": pos.skipped_steps, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "config": to_dict(self.cfg), "log_dir": str(self.logs),
            }
            extra = {}
            if self.ema is not None:
                extra["ema"], state["ema_updates"] = self.ema.module, int(self.ema.n_averaged)
            if self.adversary is not None:
                extra["discriminator"] = self.adversary.discriminator
                state["d_optimizer"] = self.adversary.optimizer.state_dict()
            ckpt.save_checkpoint(self.ckpt_dir, name, self.model, state, extra)
            every = self.cfg.train.ckpt_every
            keep = {f"epoch_{e:03d}" for e in range(1, pos.epoch + 1) if every and e % every == 0}
            ckpt.prune_checkpoints(self.ckpt_dir, keep)  # older step_* ones go; `last` always stays
        self.procs.barrier()

    def summary(self) -> dict:
        """Rank 0: summary.json of the run so far -> its dict; {} on other ranks."""
        if not self.procs.main:
            return {}
        pos = self.position
        history = rundir.read_jsonl(self.out / rundir.HISTORY)
        last = history[-1] if history else {}
        summary = {
            "epochs": last.get("epoch", pos.epoch), "steps": pos.step, "skipped_steps": pos.skipped_steps,
            "images_seen_this_run": self.images_seen * self.procs.world_size,
            "seconds_this_run": time.time() - self.started, "parameters": self.n_params,
            "device": str(self.device), "processes": self.procs.world_size,
            "final": {k: v for k, v in last.items() if "/" in k},
            "skipped_files": len(self.bad_files), "skipped": dict(sorted(self.bad_files.reasons.items())),
            "checkpoint": str(self.ckpt_dir / ckpt.LAST), "grids": str(self.grid_dir), "logs": str(self.logs),
        }
        self.log.summary(summary)
        return summary

    # -- helpers ------------------------------------------------------------------
    def eval_model(self) -> VAE:
        """The weights that make grids, evaluations and samples: the EMA when kept."""
        return self.ema.module if self.ema is not None else self.model

    def last_checkpoint(self) -> Path | None:
        last = self.ckpt_dir / ckpt.LAST
        return last.resolve() if last.exists() else None

    def say(self, message: str) -> None:
        if self.procs.main:
            print(message)
