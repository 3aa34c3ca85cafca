"""The training loop: data -> model -> loss -> step, with eval, grids,
TensorBoard, history and atomic checkpoints at every epoch end."""

from __future__ import annotations

import fcntl
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, TrainConfig, save_config, to_dict
from .data import BadFiles, ImageDataset, build_dataset, make_loader, normalize, to_model_input
from .evaluate import evaluate_checkpoint, format_table
from .losses import gaussian_elbo
from .models import VAE, build_model
from .report import write_report
from .runtime import RunError, pick_device
from .sample import decode, grid, prior_noise, reconstruct, save_grid


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def training_step(model: VAE, x: torch.Tensor, cfg: Config):
    """Forward + loss for one normalised batch x (B, 3, S, S)."""
    return gaussian_elbo(x, model(x), cfg.loss)


@torch.no_grad()
def eval_loss(model: VAE, loader, dataset: ImageDataset, cfg: Config, device, bad: BadFiles) -> dict[str, float]:
    """Mean loss over the held-out set, reconstructing from the posterior mean
    (deterministic); the KL term is exact."""
    model.eval()
    totals, count = {}, 0
    for images, _, bad_items in loader:
        bad.add(dataset, bad_items)
        if len(images) == 0:
            continue
        x = to_model_input(images, device)
        out = model(x, sample=False)
        _, stats = gaussian_elbo(x, out, cfg.loss)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(images)
        count += len(images)
    model.train()
    return {k: v / count for k, v in totals.items()} if count else {}


def grid_images(dataset: ImageDataset, n: int) -> torch.Tensor:
    """The first n readable images of the dataset, uint8 (n', 3, S, S)."""
    images = []
    for i in range(len(dataset)):
        x, _, _ = dataset[i]
        if x is not None:
            images.append(x)
        if len(images) == n:
            break
    return torch.stack(images)


def _truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Keep only the records with record[key] <= last."""
    if path.exists():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(json.dumps(r) + "\n" for r in records if r[key] <= last))


@dataclass
class RunDirs:
    out: Path
    logs: Path

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def grids(self) -> Path:
        return self.out / "grids"


def _lock(out: Path):
    """Hold out/.lock for the life of the run: a second run on the same folder fails."""
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"another imgvae run is writing to {out} (lock file {out / '.lock'})") from None
    return handle


def train(cfg: Config, out_dir: str | Path, log_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg's model; write checkpoints, grids, history and TensorBoard logs.

    out_dir: results folder (config.yaml, checkpoints/, grids/, history.jsonl, summary.json).
    log_dir: TensorBoard folder (default out_dir/logs). resume: continue the run in out_dir.
    Returns the run summary (also written to out_dir/summary.json).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        return _train(cfg, out, log_dir, resume, progress)
    finally:
        lock.close()


def _train(cfg: Config, out: Path, log_dir, resume: bool, progress: bool) -> dict:
    tc = cfg.train
    state = None
    if resume:
        weights, state = ckpt.load_checkpoint(out)
        log_dir = log_dir or state["log_dir"]
    elif (out / "checkpoints").exists():
        raise RunError(f"{out} already holds a run; continue it with --resume {out}, or choose another -o")
    dirs = RunDirs(out, Path(log_dir) if log_dir else out / "logs")

    torch.manual_seed(tc.seed)
    device = pick_device(tc.device)
    train_set = build_dataset(cfg.data.train, cfg.data, train=True, seed=tc.seed)
    eval_set = build_dataset(cfg.data.eval, cfg.data, train=False, seed=tc.seed) if cfg.data.eval else None
    if len(train_set) < tc.batch_size:
        raise RunError(f"the training set has {len(train_set)} images, fewer than train.batch_size={tc.batch_size}")
    pin = device.type == "cuda"
    loader, sampler = make_loader(train_set, tc.batch_size, True, tc.seed, cfg.data.num_workers, pin)
    if eval_set is not None and cfg.data.eval_limit:
        eval_set_for_loss = torch.utils.data.Subset(eval_set, range(min(cfg.data.eval_limit, len(eval_set))))
    else:
        eval_set_for_loss = eval_set
    eval_loader = None
    if eval_set is not None:
        eval_loader = torch.utils.data.DataLoader(
            eval_set_for_loss, batch_size=tc.batch_size, num_workers=cfg.data.num_workers,
            collate_fn=loader.collate_fn, pin_memory=pin,
        )

    model = build_model(cfg.model, cfg.data.image_size).to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=tc.lr_gamma)
    start_epoch, step = 0, 0
    if state is not None:
        ckpt.load_weights(model, {k: v.to(device) for k, v in weights.items()}, out)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        start_epoch, step = state["epoch"], state["step"]
    save_config(cfg, out / "config.yaml")
    history_file, steps_file = out / "history.jsonl", out / "steps.jsonl"
    # Drop records written after the checkpoint we resume from.
    _truncate_jsonl(history_file, "epoch", start_epoch)
    _truncate_jsonl(steps_file, "step", step)

    n_grid = tc.grid_size**2
    fixed = grid_images(eval_set if eval_set is not None else train_set, n_grid)
    fixed_z = prior_noise(model, n_grid, seed=tc.seed)
    bad = BadFiles()
    writer = SummaryWriter(str(dirs.logs))
    started = time.time()
    images_seen = 0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"imgvae: model {cfg.model.name} ({n_params:,} parameters) on {device}; "
          f"train {len(train_set):,} images from {train_set.source.name}; "
          f"eval {len(eval_set_for_loss) if eval_set else 0:,}; epochs {start_epoch + 1}..{tc.epochs}")
    if start_epoch >= tc.epochs:
        print(f"imgvae: {out} already finished {start_epoch} epochs; raise train.epochs to continue")

    for epoch in range(start_epoch, tc.epochs):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        model.train()
        sums = {}
        epoch_images, epoch_start = 0, time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress, dynamic_ncols=True)
        for images, _, bad_items in bar:
            bad.add(train_set, bad_items)
            if len(images) < 2:  # BatchNorm needs two samples to train
                continue
            flips = torch.Generator().manual_seed(tc.seed * 1_000_003 + step) if cfg.data.hflip else None
            x = to_model_input(images, device, flips)
            loss, stats = training_step(model, x, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            epoch_images += len(images)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * len(images)
            if step % tc.log_every == 0:
                values = {k: v.item() for k, v in stats.items()}
                for k, v in values.items():
                    writer.add_scalar(f"train_step/{k}", v, step)
                with open(steps_file, "a") as f:
                    position = epoch + epoch_images / (len(sampler) or 1)
                    f.write(json.dumps({"step": step, "epoch_float": position, **values}) + "\n")
                rate = epoch_images / max(time.time() - epoch_start, 1e-9)
                bar.set_postfix(loss=f"{values['loss']:.1f}", kl=f"{values['kl']:.1f}", img_s=f"{rate:.0f}")
        bar.close()
        if epoch_images == 0:
            raise RunError(f"epoch {epoch + 1} had no readable training images")
        train_stats = {k: (v / epoch_images).item() for k, v in sums.items()}
        if not math.isfinite(train_stats["loss"]):
            raise RunError(f"epoch {epoch + 1}: training loss is {train_stats['loss']}; last good checkpoint kept")
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.time() - epoch_start
        images_seen += epoch_images
        eval_stats = eval_loss(model, eval_loader, eval_set, cfg, device, bad) if eval_loader else {}

        # The seed's three pictures, per epoch.
        nrow = tc.grid_size
        recon = reconstruct(model, normalize(fixed))
        samples = decode(model, fixed_z)
        tag = f"epoch_{epoch + 1:03d}"
        save_grid(fixed.float() / 255, nrow, dirs.grids / f"{tag}_ground_truth.png")
        save_grid(recon, nrow, dirs.grids / f"{tag}_reconstructions.png")
        save_grid(samples, nrow, dirs.grids / f"{tag}_samples.png")

        record = {
            "epoch": epoch + 1, "step": step, "lr": lr, "seconds": seconds, "img_per_s": epoch_images / seconds,
            **{f"train/{k}": v for k, v in train_stats.items()},
            **{f"eval/{k}": v for k, v in eval_stats.items()},
        }
        for k, v in record.items():
            if "/" in k or k in ("lr", "img_per_s"):
                writer.add_scalar(f"epoch/{k}", v, epoch + 1)
        writer.add_image("grids/ground_truth", grid(fixed.float() / 255, nrow), epoch + 1)
        writer.add_image("grids/reconstructions", grid(recon, nrow), epoch + 1)
        writer.add_image("grids/samples", grid(samples, nrow), epoch + 1)
        writer.flush()
        with open(history_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        msg = f"epoch {epoch + 1}: train loss {train_stats['loss']:.2f} (recon {train_stats['recon']:.2f}, kl {train_stats['kl']:.2f})"
        if eval_stats:
            msg += f", eval loss {eval_stats['loss']:.2f}"
        print(msg + f", {epoch_images / seconds:.1f} img/s")

        ckpt_state = {
            "epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})},
            "config": to_dict(cfg), "log_dir": str(dirs.logs),
        }
        ckpt.save_checkpoint(dirs.checkpoints, tag, model, ckpt_state)
        keep = {f"epoch_{e:03d}" for e in range(1, epoch + 2) if tc.ckpt_every and e % tc.ckpt_every == 0}
        ckpt.prune_checkpoints(dirs.checkpoints, keep)
    writer.close()

    last = {}
    if history_file.exists():
        lines = history_file.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    summary = {
        "epochs": last.get("epoch", start_epoch), "steps": step, "images_seen_this_run": images_seen,
        "seconds_this_run": time.time() - started, "parameters": n_params, "device": str(device),
        "final": {k: v for k, v in last.items() if "/" in k},
        "skipped_files": len(bad), "skipped": dict(sorted(bad.reasons.items())),
        "checkpoint": str(dirs.checkpoints / ckpt.LAST), "grids": str(dirs.grids), "logs": str(dirs.logs),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if tc.final_eval and cfg.data.eval:
        metrics, path = evaluate_checkpoint(dirs.checkpoints, device=str(device), seed=tc.seed,
                                            batch_size=tc.batch_size, progress=progress)
        print(f"imgvae: evaluation of the final checkpoint ({path}):\n{format_table(metrics)}")
    print(f"imgvae: report {write_report(out)}")
    print(f"imgvae: done, {summary['epochs']} epochs, {step} steps; {len(bad)} unreadable files skipped; "
          f"checkpoint {summary['checkpoint']}, grids in {dirs.grids}, TensorBoard logs in {dirs.logs}")
    return summary
