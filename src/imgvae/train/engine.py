"""The engine: trains any Task (train/task.py) with the same loop, checkpoints, resume,
preemption, time limit, precision, compile, DDP, non-finite skipping, EMA, records and
progress. `train` runs it for a VAE config; a second-stage model calls `fit` with its task.

The loop (`Engine.run`) owns only the order of calls; the parts own their state: the train
state (model, optimiser, ...), the batches, the recorder and the stop policy.
"""

from __future__ import annotations

import fcntl
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from imgvae import rundir
from imgvae.config import Config, ConfigError, Recipe, TrainConfig, load_config
from imgvae.config.resume import refuse_changes
from imgvae.io import checkpoint as ckpt
from imgvae.io.paths import with_pretrained_architecture
from imgvae.models.registry import check_model
from imgvae.runtime import RunError
from imgvae.train.precision import allow_tf32, keep_freed_memory, run_precision
from imgvae.train.processes import Interrupted, Processes, Stopped, StopSignals, start_processes, stop_processes
from imgvae.train.records import Recorder
from imgvae.train.state import TooManyBadSteps, TrainState
from imgvae.train.stop import StopPolicy
from imgvae.train.task import Callback, Callbacks, Task
from imgvae.train.vae import VAETask
from imgvae.train.watch import Diverged, DivergenceWatch


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
          progress: bool = True, callbacks: list[Callback] = ()) -> dict:
    """Train cfg's VAE; write checkpoints, grids, history and TensorBoard logs.

    out_dir: results folder (config.yaml, checkpoints/, grids/, history.jsonl, steps.jsonl,
    summary.json). log_dir: TensorBoard folder (default out_dir/logs).
    resume: continue the run in out_dir from its newest checkpoint (mid-epoch ones too).
    Under torchrun every process calls this; only rank 0 writes, and returns the run
    summary (also written to out_dir/summary.json); the others return {}.
    commands.workflow.train_and_evaluate adds the prior, the evaluation and the report.
    """
    cfg = checked_config(cfg, resume, out_dir)

    def make_task(tc: TrainConfig, procs: Processes) -> VAETask:
        return VAETask(replace(cfg, train=tc), procs)  # config.yaml records the precision used

    return fit(make_task, cfg.train, out_dir, log_dir, resume, progress, callbacks)


def checked_config(cfg: Config, resume: bool, out_dir: str | Path | None = None) -> Config:
    """cfg as the run will use it (a pretrained diffusers folder sets the architecture), refused
    before any data is read when it cannot work: a model the config cannot build, a missing FID
    weights file, a resume of out_dir that changes what its checkpoints were made with."""
    if cfg.model.pretrained and not resume:
        cfg = with_pretrained_architecture(cfg)
    model = check_model(cfg)
    if cfg.loss.align and (model.discrete or len(model.latent_shape) != 3):
        raise ConfigError(f"loss.align aligns a spatial continuous latent (kl-f4, kl-f8, autoencoder-kl); model "
                          f"{cfg.model.name!r} has {'a discrete' if model.discrete else 'a flat'} latent")
    if resume and out_dir is not None and (Path(out_dir) / rundir.CONFIG).is_file():
        refuse_changes(load_config(Path(out_dir) / rundir.CONFIG), cfg)
    for key in ("fid_weights", "lpips_weights"):
        path = getattr(cfg.eval, key)
        if cfg.eval.after_training and path and not Path(path).is_file():
            raise ConfigError(f"eval.{key}: no such file {path!r}")
    return cfg


def fit(make_task: Callable[[Recipe, Processes], Task], tc: Recipe, out_dir: str | Path,
        log_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
        callbacks: list[Callback] = ()) -> dict:
    """Train the task that make_task(recipe with its precision decided, processes) builds, under the
    recipe tc (the train section, or a learned prior's section), into out_dir -> the run summary
    (rank 0; {} elsewhere)."""
    procs = start_processes(tc.device, tc.dist_backend)
    tc = replace(tc, precision=run_precision(tc.precision, procs.device))
    out, lock = Path(out_dir), None
    created = not out.exists()
    try:
        if procs.main:
            out.mkdir(parents=True, exist_ok=True)
            lock = lock_run(out)
        task = make_task(tc, procs)
        with StopSignals() as signals:
            try:
                engine = Engine(task, tc, out, log_dir, resume, progress, procs, signals, callbacks)
                try:
                    return engine.run()
                except (OSError, ckpt.CheckpointError) as e:  # a full disk, a read-only or vanished folder
                    what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
                    raise RunError(f"stopped, {what}; the last good checkpoint is {engine.last_good()}: make "
                                   f"room or fix the folder, then continue with {task.resume_command(out)}") from None
            except KeyboardInterrupt as e:  # a second Ctrl-C: stopped at once, between checkpoints
                raise interrupted(e, out, task) from None
    except BaseException:
        if lock is not None and created and {p.name for p in out.iterdir()} <= {".lock"}:
            lock.close()  # a start that failed: the folder goes as it came
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if lock is not None and not lock.closed:
            (out / ".lock").unlink(missing_ok=True)  # still ours: no other run can hold it
            lock.close()
        stop_processes(procs)


def interrupted(e: KeyboardInterrupt, out: Path, task: Task) -> KeyboardInterrupt:
    """The interruption of the run in `out`, saying what it kept and how to continue."""
    if isinstance(e, Interrupted):
        return e
    last = out / rundir.CHECKPOINTS / ckpt.LAST
    if last.exists():
        return Interrupted(f"interrupted; the last finished checkpoint is kept: {last.resolve()}; continue with "
                           f"{task.resume_command(out)}")
    return Interrupted("interrupted before the first checkpoint: nothing to resume from")


class Engine:
    """One run of one task: builds the parts, restores them on resume, and runs the loop."""

    def __init__(self, task: Task, tc: Recipe, out: Path, log_dir, resume: bool, progress: bool,
                 procs: Processes, signals: StopSignals | None = None, callbacks: list[Callback] = ()):
        self.task, self.tc, self.out, self.procs = task, tc, out, procs
        self.callback, self.ckpt_dir = Callbacks(callbacks), out / rundir.CHECKPOINTS
        if not resume and self.ckpt_dir.exists():
            raise RunError(f"{out} already holds a run; continue it with {task.resume_command(out)}, or choose "
                           "another output folder")
        weights, state = None, None
        if resume and (self.ckpt_dir / ckpt.LAST).exists():
            weights, state = ckpt.load_checkpoint(out)
        elif resume and procs.main:  # stopped before its first checkpoint: nothing to lose by starting over
            print(f"imgvae: {out} has no checkpoint yet; starting it from the beginning")
        self.logs = Path(log_dir) if log_dir else rundir.resolved(out, state["log_dir"] if state else rundir.LOGS)
        if procs.device.type == "cpu" and tc.keep_freed_memory:
            keep_freed_memory()
        if procs.device.type == "cuda":
            allow_tf32(tc.tf32)
        torch.manual_seed(tc.seed)
        self.batches = task.batches()
        model = task.build_model(fresh=state is None)
        total_steps = tc.epochs * math.ceil(self.batches.per_epoch / tc.grad_accum)
        self.state = TrainState(model, tc, procs, total_steps, task.adversary)
        if state is not None:
            self.state.load_state_dict(state, lambda module, key: self._load(module, key, weights))
        self.state.wrap()
        self.recorder = Recorder(out, self.logs, procs.main, progress)
        self.stop = StopPolicy(tc.time_limit, tc.log_every, procs, signals)
        self.watch = DivergenceWatch(tc.divergence_factor)
        if state is not None:
            self.watch.load_state_dict(state)

    def _load(self, module: torch.nn.Module, key: str, weights: dict) -> None:
        tensors = weights if key == "model" else ckpt.load_extra(self.out, key, self.procs.device)
        ckpt.load_weights(module, {k: v.to(self.procs.device) for k, v in tensors.items()}, self.out)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        """Train up to train.epochs (or train.time_limit) -> the run summary."""
        tc, task, state, pos = self.tc, self.task, self.state, self.state.position
        self.begin()
        stopped = None
        while pos.epoch < tc.epochs and stopped is None:
            self.say(self.batches.start_epoch(pos.epoch, pos.batches_done))
            task.train_mode(state.train_model)
            self.recorder.start_bar(pos.epoch, tc.epochs, pos.batches_done, len(self.batches))
            for micro_batches in steps(self.batches, tc.grad_accum, self.batches.per_epoch - pos.batches_done):
                pos.batches_done += len(micro_batches)
                self.callback.on_step_start(state)
                result = state.step(task, micro_batches, self.callback)
                self.recorder.advance(len(micro_batches), result[0].count if result else 0)
                if result is None:  # every micro-batch was too small to train on
                    continue
                self.callback.on_step_end(state)
                if pos.step % tc.log_every == 0:
                    self.settle()
                    values = result[0].means(self.procs) | {"grad_norm": result[1].item()}
                    self.check(f"step {pos.step}", values)
                    self.recorder.step(pos.step, pos.epoch + pos.batches_done / self.batches.per_epoch, values,
                                       self.procs.world_size)
                stopped = self.stop.reason(pos.step, pos.batches_done == self.batches.per_epoch)
                if stopped or (tc.ckpt_every_steps and pos.step % tc.ckpt_every_steps == 0):
                    self.save_checkpoint(f"step_{pos.step:08d}")
                if stopped:
                    break
            self.recorder.close_bar()
            self.images_seen += self.recorder.epoch_images
            # Stopped mid-epoch, or by a signal: a resume ends the epoch (a preempted job must exit fast).
            if pos.batches_done == self.batches.per_epoch and stopped in (None, "time limit"):
                self.end_epoch(time.time() - self.recorder.epoch_start)
        return self.finish(stopped)

    def begin(self) -> None:
        """Before the first step: the run's records (rank 0), the task's fixed pictures, the banner."""
        tc, procs, pos = self.tc, self.procs, self.state.position
        self.recorder.begin(self.task.config_dict(), pos.epoch, pos.step)
        if procs.main:
            self.task.begin()
        self.started, self.images_seen = time.time(), 0
        self.n_params = sum(p.numel() for p in self.state.model.parameters())
        self.say(f"imgvae: model {self.task.name} ({self.n_params:,} parameters) on {procs.device}"
                 f"{f' x {procs.world_size} processes' if procs.distributed else ''} in {tc.precision}; "
                 f"{self.task.describe()}; epochs {pos.epoch + 1}..{tc.epochs}")
        if pos.epoch >= tc.epochs:
            self.say(f"imgvae: {self.out} already finished {pos.epoch} epochs; raise {self.task.epochs_key} to "
                     "continue")

    def end_epoch(self, seconds: float) -> None:
        """After the epoch's last step: history, held-out statistics, pictures, learning-rate step, checkpoint."""
        self.settle()
        train_stats, lr = self.state.end_epoch()
        pos = self.state.position
        self.check(f"epoch {pos.epoch} (step {pos.step})", train_stats, epoch=True)
        eval_stats, pictures = self.task.end_epoch(self.state.eval_model(), pos.epoch) if self.procs.main else ({}, {})
        self.refuse_non_finite(eval_stats, pos.epoch)
        if self.procs.main:
            self.recorder.pictures(pos.epoch, pictures, self.task.picture_columns)
            rate = self.recorder.epoch_images * self.procs.world_size / seconds
            self.recorder.epoch({"epoch": pos.epoch, "step": pos.step, "lr": lr, "seconds": seconds,
                                 "img_per_s": rate, "data_wait": self.batches.wait / seconds,
                                 "views": self.recorder.epoch_images * self.procs.world_size,
                                 "skipped_steps": pos.skipped_steps,
                                 **{f"train/{k}": v for k, v in train_stats.items()},
                                 **{f"eval/{k}": v for k, v in eval_stats.items()}})
        self.save_checkpoint(f"epoch_{pos.epoch:03d}")

    def refuse_non_finite(self, eval_stats: dict, epoch: int) -> None:
        """Stop, before the epoch's checkpoint is written, when its held-out statistics (rank 0's)
        are not finite: weights that overflow on real images never become `last`."""
        bad = [f"{k} {v}" for k, v in eval_stats.items() if not math.isfinite(v)]
        if self.procs.all_reduce_max(torch.tensor([float(bool(bad))]))[0]:
            said = f": held-out {', '.join(bad)}" if bad else ""
            raise RunError(f"diverged at epoch {epoch}{said}; stopped without saving, last good checkpoint kept: "
                           f"{self.last_good()}. Likely keys: {self.task.likely_keys()}")

    def finish(self, stopped: str | None) -> dict:
        pos = self.state.position
        self.recorder.close()
        self.settle()
        summary = self.summary()
        if stopped == "time limit":
            self.say(f"imgvae: {self.tc.section}.time_limit of {self.tc.time_limit} min reached at step {pos.step}; "
                     f"continue with {self.task.resume_command(self.out)}")
        elif stopped:
            raise Stopped(f"stopped by {stopped} at step {pos.step}, checkpoint {self.last_checkpoint()}; "
                          f"continue with {self.task.resume_command(self.out)}", signal.Signals[stopped])
        return summary

    def settle(self) -> None:
        try:
            self.state.settle()
        except TooManyBadSteps as e:
            raise RunError(f"{e}; stopped, last good checkpoint kept: {self.last_good()}. "
                           f"Likely keys: {self.task.likely_keys()}, train.grad_clip={self.tc.grad_clip}") from None

    def check(self, where: str, stats: dict, epoch: bool = False) -> None:
        """Stop on finite divergence, before the diverged weights are saved."""
        try:
            self.watch.observe(where, stats, epoch)
        except Diverged as e:
            raise RunError(f"diverged at {e}; stopped without saving, last good checkpoint kept: "
                           f"{self.last_good()}. Likely keys: {self.task.likely_keys()}") from None

    def last_good(self) -> str:
        last = self.last_checkpoint()
        return str(last) if last is not None else "none (no checkpoint was written yet)"

    def save_checkpoint(self, name: str) -> None:
        """Rank 0 writes everything needed to resume from exactly here; the others wait."""
        self.settle()
        self.callback.before_checkpoint(name)
        if self.procs.main:
            state = {**self.state.state_dict(), **self.watch.state_dict(), "config": self.task.config_dict(),
                     "log_dir": rundir.recorded(self.out, self.logs)}
            modules = self.state.modules()
            ckpt.save_checkpoint(self.ckpt_dir, name, modules.pop("model"), state, modules)
            every, epoch = self.tc.ckpt_every, self.state.position.epoch
            keep = {f"epoch_{e:03d}" for e in range(1, epoch + 1) if every and e % every == 0}
            ckpt.prune_checkpoints(self.ckpt_dir, keep)  # older step_* ones go; `last` always stays
        self.procs.barrier()
        self.callback.on_checkpoint(name)

    def summary(self) -> dict:
        """Rank 0: summary.json of the run so far -> its dict; {} on other ranks."""
        if not self.procs.main:
            return {}
        pos = self.state.position
        history = rundir.read_jsonl(self.out / rundir.HISTORY)
        last = history[-1] if history else {}
        summary = {
            "epochs": last.get("epoch", pos.epoch), "steps": pos.step, "skipped_steps": pos.skipped_steps,
            "images_seen_this_run": self.images_seen * self.procs.world_size,
            "seconds_this_run": time.time() - self.started, "parameters": self.n_params,
            "device": str(self.procs.device), "processes": self.procs.world_size,
            "final": {k: v for k, v in last.items() if "/" in k},
            **self.task.summary(self.out),
            "checkpoint": rundir.recorded(self.out, self.ckpt_dir / ckpt.LAST),
            "logs": rundir.recorded(self.out, self.logs),
        }
        self.recorder.summary(summary)
        return summary

    def last_checkpoint(self) -> Path | None:
        last = self.ckpt_dir / ckpt.LAST
        return last.resolve() if last.exists() else None

    def say(self, message: str | None) -> None:
        if message and self.procs.main:
            print(message)


def steps(batches, accum: int, left: int):
    """The rest of an epoch's batches as optimiser steps: lists of up to `accum` micro-batches
    (the epoch's last step may be short); `left` is how many batches the epoch has left."""
    micro_batches = []
    for i, batch in enumerate(batches):
        micro_batches.append(batch)
        if len(micro_batches) == accum or i + 1 == left:
            yield micro_batches
            micro_batches = []
