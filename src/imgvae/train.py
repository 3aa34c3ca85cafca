"""The training loop: data -> model -> loss -> step, with eval, grids, TensorBoard,
history and atomic checkpoints; one process or many under torchrun (DDP).

Every random choice of a step (flips, reparametrisation noise) is drawn for the
global batch from (seed, step, micro-batch) and each process takes its rows, so a
run resumed mid-epoch, or split over N processes, repeats the same computation.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import checkpoint as ckpt
from .adversarial import Adversary
from .config import Config, TrainConfig, save_config, to_dict
from .data import BadFiles, build_dataset, first_images, loader_workers, make_loader, normalize, to_model_input
from .evaluate import eval_loss, evaluate_checkpoint, format_table
from .features import PerceptualDistance
from .losses import decoder_scale, kl_weight, vae_loss
from .models import VAE, build_model
from .optim import build_optimizer, ema_with_warmup
from .prior import fit_checkpoint_prior
from .report import FITTED_PRIOR_GRID, write_report
from .runtime import Processes, RunError, autocast, grad_scaler, keep_freed_memory, start_processes, stop_processes
from .sample import decode, grid, prior_noise, reconstruct, save_grid


def step_randomness(cfg: TrainConfig, step: int, micro: int, n: int, latent_shape, procs: Processes):
    """(flip mask (n,), reparametrisation noise (n, *latent_shape)) for this process's
    n images in micro-batch `micro` of optimiser step `step`.

    Draws are made for the step's global batch (batch_size x grad_accum x processes)
    and indexed by global position: DistributedSampler gives rank r the epoch
    positions r, r + W, ..., so its micro-batch m holds r + W * (m * B + j). One
    process with a W * A times larger batch therefore draws the same values.
    """
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    total = cfg.batch_size * cfg.grad_accum * procs.world_size
    flips = torch.rand(total, generator=generator) < 0.5
    noise = torch.randn(total, *latent_shape, generator=generator)
    positions = procs.rank + procs.world_size * (micro * cfg.batch_size + torch.arange(n))
    return flips[positions], noise[positions]


def training_step(model, x: torch.Tensor, noise: torch.Tensor, cfg: Config, kl_scale: float,
                  perceptual=None, adversary: Adversary | None = None, last_layer=None):
    """Forward (under autocast) + loss in fp32 for one normalised batch x (B, 3, S, S),
    plus the adversary's generator term when given. -> (loss, stats, decoder mean)."""
    with autocast(x.device, cfg.train.precision):
        out = model(x, noise=noise)
    out = out.float()
    loss, stats = vae_loss(x, out, cfg.loss, kl_scale, perceptual)
    if adversary is not None:
        term, gan_stats = adversary.generator_term(loss, out.x_hat, last_layer)
        loss = loss + term
        stats |= gan_stats | {"loss": loss.detach()}
    return loss, stats, out.x_hat


def _lock(out: Path):
    """Hold out/.lock for the life of the run: a second run on the same folder fails."""
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"another imgvae run is writing to {out} (lock file {out / '.lock'})") from None
    return handle


def _truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Keep only the records with record[key] <= last."""
    if path.exists():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(json.dumps(r) + "\n" for r in records if r[key] <= last))


def train(cfg: Config, out_dir: str | Path, log_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg's model; write checkpoints, grids, history and TensorBoard logs.

    out_dir: results folder (config.yaml, checkpoints/, grids/, history.jsonl, summary.json,
    metrics.json, report.html). log_dir: TensorBoard folder (default out_dir/logs).
    resume: continue the run in out_dir from its newest checkpoint (mid-epoch ones too).
    Under torchrun every process calls this; only rank 0 writes.
    Returns the run summary (also written to out_dir/summary.json).
    """
    procs = start_processes(cfg.train.device)
    out = Path(out_dir)
    lock = None
    try:
        if procs.main:
            out.mkdir(parents=True, exist_ok=True)
            lock = _lock(out)
        return Trainer(cfg, out, log_dir, resume, progress, procs).run()
    finally:
        if lock is not None:
            lock.close()
        stop_processes(procs)


class Trainer:
    """One run's state; `run` is the loop, read top to bottom."""

    def __init__(self, cfg: Config, out: Path, log_dir, resume: bool, progress: bool, procs: Processes):
        tc = self.tc = cfg.train
        self.cfg, self.out, self.procs, self.progress = cfg, out, procs, progress and procs.main
        state = None
        if resume:
            weights, state = ckpt.load_checkpoint(out)
            log_dir = log_dir or state["log_dir"]
        elif (out / "checkpoints").exists():
            raise RunError(f"{out} already holds a run; continue it with --resume {out}, or choose another -o")
        self.logs = Path(log_dir) if log_dir else out / "logs"
        self.ckpt_dir, self.grid_dir = out / "checkpoints", out / "grids"
        device = self.device = procs.device
        if device.type == "cpu" and tc.keep_freed_memory:
            keep_freed_memory()

        torch.manual_seed(tc.seed)
        self.train_set = build_dataset(cfg.data.train, cfg.data, train=True, seed=tc.seed)
        self.eval_set = build_dataset(cfg.data.eval, cfg.data, train=False, seed=tc.seed) if cfg.data.eval else None
        if len(self.train_set) < tc.batch_size * procs.world_size:
            raise RunError(f"the training set has {len(self.train_set)} images, fewer than one global batch "
                           f"(train.batch_size={tc.batch_size} x {procs.world_size} processes)")
        pin = device.type == "cuda"
        workers = loader_workers(self.train_set, cfg.data.num_workers, device)
        # The budget is per machine: torchrun's processes on it keep a copy each.
        memory_budget = cfg.data.memory_cache_gb * 2**30 / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.in_memory = self.train_set.keep_in_memory(memory_budget, shared=workers > 0)
        self.loader, self.sampler = make_loader(self.train_set, tc.batch_size, True, tc.seed, workers,
                                                pin, procs.rank, procs.world_size)
        self.eval_loader = None
        if self.eval_set is not None and procs.main:
            limit = cfg.data.eval_limit or len(self.eval_set)
            subset = torch.utils.data.Subset(self.eval_set, range(min(limit, len(self.eval_set))))
            workers = loader_workers(self.eval_set, cfg.data.num_workers, device)
            self.eval_set.keep_in_memory(memory_budget, shared=workers > 0)
            self.eval_loader = torch.utils.data.DataLoader(subset, batch_size=tc.batch_size, num_workers=workers,
                                                           collate_fn=self.loader.collate_fn, pin_memory=pin)

        self.raw_model = build_model(cfg.model, cfg.data.image_size, decoder_scale(cfg.loss)).to(device)
        if tc.channels_last:
            self.raw_model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.raw_model, tc)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=tc.lr_gamma)
        self.scaler = grad_scaler(device, tc.precision)
        self.ema = None
        if tc.ema > 0:  # the averaged copy makes grids, evaluation and samples
            self.ema = AveragedModel(self.raw_model, multi_avg_fn=ema_with_warmup(tc.ema), use_buffers=True)
        self.perceptual = PerceptualDistance().to(device) if cfg.loss.perceptual > 0 else None
        self.adversary = None
        if cfg.loss.adversarial > 0:
            self.adversary = Adversary(cfg, device, procs.world_size)
        per_epoch = len(self.sampler.base) // tc.batch_size
        self.total_steps = tc.epochs * math.ceil(per_epoch / tc.grad_accum)
        # Position: finished epochs, optimiser steps, loader batches done in the current epoch.
        self.epoch, self.step, self.batches_done = 0, 0, 0
        self.epoch_sums, self.epoch_images, self.bad_steps, self.skipped_steps = {}, 0, 0, 0
        if state is not None:
            ckpt.load_weights(self.raw_model, {k: v.to(device) for k, v in weights.items()}, out)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.step, self.batches_done = state["epoch"], state["step"], state["batches_done"]
            self.epoch_sums, self.epoch_images = state["epoch_sums"], state["epoch_images"]
            self.skipped_steps = state["skipped_steps"]
            if self.ema is not None:
                ckpt.load_weights(self.ema.module, ckpt.load_extra(out, "ema", device), out)
                self.ema.n_averaged.fill_(state["ema_updates"])
            if self.adversary is not None:
                ckpt.load_weights(self.adversary.discriminator, ckpt.load_extra(out, "discriminator", device), out)
                self.adversary.optimizer.load_state_dict(state["d_optimizer"])
        model = self.raw_model
        if procs.distributed:
            if device.type == "cuda":  # BatchNorm statistics over the global batch (needs GPUs)
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.ddp = model
        self.model = torch.compile(model) if tc.compile else model
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]

    # -- the loop ---------------------------------------------------------------
    def run(self) -> dict:
        cfg, tc, procs = self.cfg, self.tc, self.procs
        history, steps_file = self.out / "history.jsonl", self.out / "steps.jsonl"
        writer = None
        if procs.main:
            save_config(cfg, self.out / "config.yaml")
            _truncate_jsonl(history, "epoch", self.epoch)  # drop records newer than the checkpoint
            _truncate_jsonl(steps_file, "step", self.step)
            writer = SummaryWriter(str(self.logs))
        n_grid = tc.grid_size**2
        fixed = first_images(self.eval_set if self.eval_set is not None else self.train_set, n_grid) if procs.main else None
        fixed_z = prior_noise(self.raw_model, n_grid, seed=tc.seed)
        bad = BadFiles()
        started, images_seen = time.time(), 0
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        self._say(f"imgvae: model {cfg.model.name} ({n_params:,} parameters) on {self.device}"
                  f"{f' x {procs.world_size} processes' if procs.distributed else ''}; train {len(self.train_set):,} images "
                  f"from {self.train_set.source.name}; eval {len(self.eval_loader.dataset) if self.eval_loader else 0:,}; "
                  f"epochs {self.epoch + 1}..{tc.epochs}"
                  f"{'; training views kept in RAM once decoded' if self.in_memory else ''}")
        if self.epoch >= tc.epochs:
            self._say(f"imgvae: {self.out} already finished {self.epoch} epochs; raise train.epochs to continue")

        out_of_time = False
        while self.epoch < tc.epochs:
            epoch = self.epoch
            self.sampler.set_epoch(epoch, start=self.batches_done * tc.batch_size)
            self.train_set.set_epoch(epoch)
            self.model.train()
            epoch_start, micro, run_images = time.time(), 0, 0
            per_epoch = len(self.sampler.base) // tc.batch_size  # loader batches in a whole epoch
            bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not self.progress, dynamic_ncols=True,
                       initial=self.batches_done, total=self.batches_done + len(self.loader))
            for images, _, bad_items in bar:
                bad.add(self.train_set, bad_items)
                self.batches_done += 1
                if micro == 0:  # a new optimiser step: the epoch's last one may be short
                    group, group_sums, group_images, loss_finite = min(tc.grad_accum, per_epoch - self.batches_done + 1), {}, 0, True
                    # BatchNorm statistics move in the forward pass: keep a copy to undo a skipped step.
                    saved_buffers = [b.detach().clone() for b in self.raw_model.buffers()]
                    gan = self.adversary is not None and self.adversary.active(self.step)
                if len(images) >= 2:  # BatchNorm needs two samples to train
                    flips, noise = step_randomness(tc, self.step, micro, len(images), self.raw_model.latent_shape, procs)
                    x = to_model_input(images, self.device, flips if cfg.data.hflip else None)
                    if tc.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    last_micro = micro + 1 == group or self.batches_done == per_epoch
                    # Under DDP, gradients are all-reduced only on the step's last micro-batch.
                    with self.ddp.no_sync() if procs.distributed and not last_micro else nullcontext():
                        loss, stats, x_hat = training_step(
                            self.model, x, noise.to(self.device), cfg, kl_weight(cfg.loss, self.step, self.total_steps),
                            self.perceptual, self.adversary if gan else None, self.raw_model.last_layer())
                        self.scaler.scale(loss / group).backward()
                    if gan:
                        stats["discriminator"] = self.adversary.accumulate(x, x_hat, 1 / group)
                    loss_finite &= bool(torch.isfinite(loss))
                    for k, v in stats.items():
                        group_sums[k] = group_sums.get(k, 0.0) + v.item() * len(images)
                    group_images += len(images)
                    run_images += len(images)
                micro += 1
                if micro < group and self.batches_done < per_epoch:
                    continue
                micro = 0
                if group_images == 0:
                    continue
                grad_norm, applied = self._optimizer_step(loss_finite)
                if gan:
                    self.adversary.step()
                if applied:  # statistics of skipped steps would be NaN
                    for k, v in group_sums.items():
                        self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                    self.epoch_images += group_images
                else:
                    with torch.no_grad():
                        for buffer, saved in zip(self.raw_model.buffers(), saved_buffers):
                            buffer.copy_(saved)
                if self.step % tc.log_every == 0:
                    keys = sorted(group_sums)  # the global batch's means, as in a single process
                    sums = procs.all_reduce_sum(torch.tensor([group_sums[k] for k in keys] + [group_images], dtype=torch.float64))
                    values = {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)} | {"grad_norm": grad_norm}
                if self.step % tc.log_every == 0 and procs.main:
                    for k, v in values.items():
                        writer.add_scalar(f"train_step/{k}", v, self.step)
                    with open(steps_file, "a") as f:
                        f.write(json.dumps({"step": self.step, "epoch_float": epoch + self.batches_done / per_epoch, **values}) + "\n")
                    rate = run_images * procs.world_size / max(time.time() - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{values['loss']:.1f}", kl=f"{values['kl']:.1f}", img_s=f"{rate:.0f}")
                out_of_time = bool(tc.time_limit) and time.time() - started > 60 * tc.time_limit
                if out_of_time or (tc.time_limit and procs.distributed):  # rank clocks differ: agree
                    out_of_time = procs.all_reduce_sum(torch.tensor([float(out_of_time)]))[0].item() > 0
                if out_of_time or (tc.ckpt_every_steps and self.step % tc.ckpt_every_steps == 0):
                    self._checkpoint(f"step_{self.step:08d}")
                if out_of_time:
                    break
            bar.close()
            seconds = time.time() - epoch_start
            images_seen += run_images
            if self.batches_done == per_epoch:  # else stopped mid-epoch by train.time_limit
                self._end_epoch(seconds, run_images, bad, fixed, fixed_z, writer, history)
            if out_of_time:
                self._say(f"imgvae: train.time_limit of {tc.time_limit} min reached at step {self.step}; "
                          f"continue with --resume {self.out}")
                break
        if writer is not None:
            writer.close()
        return self._finish(history, started, images_seen, n_params, bad)

    def _optimizer_step(self, loss_finite: bool) -> tuple[float, bool]:
        """Unscale, clip, and step unless the gradient norm is not finite (then skip).
        -> (gradient norm, whether the step was applied)."""
        tc = self.tc
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        # Gradients are already averaged over processes, so every process takes the same decision.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).item()
        applied = math.isfinite(grad_norm)
        if applied:
            self.scaler.step(self.optimizer)
            self.bad_steps = 0
            if self.ema is not None:
                self.ema.update_parameters(self.raw_model)
        else:
            self.skipped_steps += 1
            # fp16 overflows with a finite loss are the GradScaler's business (it lowers the scale).
            self.bad_steps += 1 if not (self.scaler.is_enabled() and loss_finite) else 0
            if self.bad_steps >= tc.max_bad_steps:
                last = (self.ckpt_dir / ckpt.LAST).resolve() if (self.ckpt_dir / ckpt.LAST).exists() else None
                raise RunError(f"{self.bad_steps} steps in a row had a non-finite loss or gradient (step {self.step + 1}); "
                               f"stopped, last good checkpoint kept: {last}. Try a lower train.lr or train.grad_clip")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm, applied

    def eval_model(self) -> VAE:
        """The weights that make grids, evaluations and samples: the EMA when kept."""
        return self.ema.module if self.ema is not None else self.raw_model

    def _end_epoch(self, seconds, run_images, bad, fixed, fixed_z, writer, history) -> None:
        cfg, tc, procs, epoch = self.cfg, self.tc, self.procs, self.epoch
        keys = sorted(self.epoch_sums)
        totals = procs.all_reduce_sum(torch.tensor([self.epoch_sums[k] for k in keys] + [self.epoch_images], dtype=torch.float64))
        if totals[-1] == 0:
            raise RunError(f"epoch {epoch + 1} had no readable training images (or every step was skipped)")
        train_stats = {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.epoch, self.batches_done, self.epoch_sums, self.epoch_images = epoch + 1, 0, {}, 0
        if procs.main:
            model = self.eval_model()
            eval_stats = eval_loss(model, self.eval_loader, self.eval_set, cfg, self.device, bad) if self.eval_loader else {}
            # The seed's three pictures, per epoch.
            nrow = tc.grid_size
            truth, recon, samples = fixed.float() / 255, reconstruct(model, normalize(fixed)), decode(model, fixed_z)
            tag = f"epoch_{epoch + 1:03d}"
            for kind, images in (("ground_truth", truth), ("reconstructions", recon), ("samples", samples)):
                save_grid(images, nrow, self.grid_dir / f"{tag}_{kind}.png")
                writer.add_image(f"grids/{kind}", grid(images, nrow), epoch + 1)
            rate = run_images * procs.world_size / seconds
            record = {
                "epoch": epoch + 1, "step": self.step, "lr": lr, "seconds": seconds, "img_per_s": rate,
                "skipped_steps": self.skipped_steps,
                **{f"train/{k}": v for k, v in train_stats.items()},
                **{f"eval/{k}": v for k, v in eval_stats.items()},
            }
            for k, v in record.items():
                if "/" in k or k in ("lr", "img_per_s"):
                    writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            writer.flush()
            with open(history, "a") as f:
                f.write(json.dumps(record) + "\n")
            msg = f"epoch {epoch + 1}: train loss {train_stats['loss']:.2f} (recon {train_stats['recon']:.2f}, kl {train_stats['kl']:.2f})"
            if eval_stats:
                msg += f", eval loss {eval_stats['loss']:.2f}"
            if self.skipped_steps:
                msg += f", {self.skipped_steps} non-finite steps skipped so far"
            print(msg + f", {rate:.1f} img/s")
        self._checkpoint(f"epoch_{epoch + 1:03d}")

    def _checkpoint(self, name: str) -> None:
        """Rank 0 writes everything needed to resume from exactly here; others wait."""
        if self.procs.main:
            state = {
                "epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
                "epoch_sums": self.epoch_sums, "epoch_images": self.epoch_images, "skipped_steps": self.skipped_steps,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "config": to_dict(self.cfg), "log_dir": str(self.logs),
            }
            extra = {}
            if self.ema is not None:
                extra["ema"], state["ema_updates"] = self.ema.module, int(self.ema.n_averaged)
            if self.adversary is not None:
                extra["discriminator"], state["d_optimizer"] = self.adversary.discriminator, self.adversary.optimizer.state_dict()
            ckpt.save_checkpoint(self.ckpt_dir, name, self.raw_model, state, extra)
            every = self.tc.ckpt_every
            keep = {f"epoch_{e:03d}" for e in range(1, self.epoch + 1) if every and e % every == 0}
            ckpt.prune_checkpoints(self.ckpt_dir, keep)  # older step_* ones go; `last` always stays
        self.procs.barrier()

    def _finish(self, history: Path, started: float, images_seen: int, n_params: int, bad: BadFiles) -> dict:
        if not self.procs.main:
            return {}
        lines = history.read_text().splitlines() if history.exists() else []
        last = json.loads(lines[-1]) if lines else {}
        summary = {
            "epochs": last.get("epoch", self.epoch), "steps": self.step, "skipped_steps": self.skipped_steps,
            "images_seen_this_run": images_seen * self.procs.world_size, "seconds_this_run": time.time() - started,
            "parameters": n_params, "device": str(self.device), "processes": self.procs.world_size,
            "final": {k: v for k, v in last.items() if "/" in k},
            "skipped_files": len(bad), "skipped": dict(sorted(bad.reasons.items())),
            "checkpoint": str(self.ckpt_dir / ckpt.LAST), "grids": str(self.grid_dir), "logs": str(self.logs),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.tc.prior_images:
            self._fit_prior()
        if self.tc.final_eval and self.cfg.data.eval:
            metrics, path = evaluate_checkpoint(self.ckpt_dir, device=str(self.device), seed=self.tc.seed,
                                                batch_size=self.tc.batch_size, progress=self.progress)
            print(f"imgvae: evaluation of the final checkpoint ({path}):\n{format_table(metrics)}")
        print(f"imgvae: report {write_report(self.out)}")
        print(f"imgvae: done, {summary['epochs']} epochs, {self.step} steps ({self.skipped_steps} non-finite skipped); "
              f"{len(bad)} unreadable files skipped; checkpoint {summary['checkpoint']}, grids in {self.grid_dir}, "
              f"TensorBoard logs in {self.logs}")
        return summary

    def _fit_prior(self) -> None:
        """Fit the prior on the last checkpoint and draw the grid's noise through it."""
        prior, path = fit_checkpoint_prior(self.ckpt_dir, limit=self.tc.prior_images, batch_size=self.tc.batch_size,
                                           device=str(self.device), progress=self.progress)
        model = self.eval_model()
        samples = decode(model, prior_noise(model, self.tc.grid_size**2, self.tc.seed, prior=prior))
        save_grid(samples, self.tc.grid_size, self.grid_dir / FITTED_PRIOR_GRID)
        print(f"imgvae: fitted {prior.describe()} ({path}); "
              f"its samples: {self.grid_dir / FITTED_PRIOR_GRID}")

    def _say(self, message: str) -> None:
        if self.procs.main:
            print(message)
