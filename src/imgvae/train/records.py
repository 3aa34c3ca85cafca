"""What a training run writes for people to read (rank 0 only): config.yaml, steps.jsonl,
history.jsonl, the per-epoch pictures, TensorBoard scalars and images, summary.json, the
progress bar and the lines printed. Other ranks get a recorder that writes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from imgvae import rundir
from imgvae.io.pictures import grid, save_grid


class Recorder:
    """The records of the run in `out`, from position (epoch, step) on: newer records, left by
    a run that stopped after its last checkpoint, are dropped; the resumed run writes them again."""

    def __init__(self, out: Path, logs: Path, main: bool, progress: bool):
        self.out, self.logs, self.main, self.progress = out, logs, main, progress and main
        self.writer, self.bar = None, None

    def begin(self, config: dict, epoch: int, step: int) -> None:
        if not self.main:
            return
        from torch.utils.tensorboard import SummaryWriter  # rank 0 only: TensorBoard's import is slow

        rundir.write_text_atomic(self.out / rundir.CONFIG, yaml.safe_dump(config, sort_keys=False))
        rundir.truncate_jsonl(self.out / rundir.HISTORY, "epoch", epoch)
        rundir.truncate_jsonl(self.out / rundir.STEPS, "step", step)
        self.writer = SummaryWriter(str(self.logs))

    def say(self, message: str) -> None:
        if self.main:
            print(message)

    # -- the progress bar ------------------------------------------------------------
    def start_bar(self, epoch: int, epochs: int, done: int, left: int) -> None:
        self.bar = tqdm(total=done + left, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                        disable=not self.progress, dynamic_ncols=True)
        self.epoch_start, self.epoch_images = time.time(), 0

    def advance(self, batches: int, images: int) -> None:
        self.bar.update(batches)
        self.epoch_images += images

    def close_bar(self) -> None:
        self.bar.close()

    # -- records -----------------------------------------------------------------------
    def step(self, step: int, epoch_float: float, values: dict[str, float], world_size: int) -> None:
        """Every train.log_every steps: the global batch's means to steps.jsonl, TensorBoard, the bar."""
        if not self.main:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"train_step/{k}", v, step)
        rundir.append_jsonl(self.out / rundir.STEPS, {"step": step, "epoch_float": epoch_float, **values})
        rate = self.epoch_images * world_size / max(time.time() - self.epoch_start, 1e-9)
        shown = {k: f"{values[k]:.1f}" for k in ("loss", "kl") if k in values}
        self.bar.set_postfix(**shown, img_s=f"{rate:.0f}")

    def pictures(self, epoch: int, pictures: dict[str, torch.Tensor], nrow: int) -> None:
        """{kind: [0, 1] images (n, 3, S, S)} -> grids/epoch_NNN_<kind>.png and TensorBoard."""
        for kind, images in pictures.items():
            save_grid(images, nrow, rundir.epoch_grid(self.out, epoch, kind))
            self.writer.add_image(f"grids/{kind}", grid(images, nrow), epoch)

    def epoch(self, record: dict) -> None:
        """One line of history.jsonl; its losses, learning rate and speed to TensorBoard; a line printed."""
        for k, v in record.items():
            if "/" in k or k in ("lr", "img_per_s"):
                self.writer.add_scalar(f"epoch/{k}", v, record["epoch"])
        self.writer.flush()
        rundir.append_jsonl(self.out / rundir.HISTORY, record)
        print(epoch_line(record))

    def summary(self, summary: dict) -> None:
        if self.main:
            rundir.write_text_atomic(self.out / rundir.SUMMARY, json.dumps(summary, indent=2))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def epoch_line(record: dict) -> str:
    """"epoch 3: train loss 1009.38 (recon 961.96, kl 47.43), eval loss 1805.54, 168.4 img/s";
    for a discrete latent "(recon ..., rate ..., quantiser ...)": the loss is recon + quantiser,
    the rate a constant."""
    train = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("train/")}
    names = {"recon": "recon", "kl": "rate" if "quantizer" in train else "kl", "quantizer": "quantiser"}
    parts = ", ".join(f"{names[k]} {train[k]:.2f}" for k in names if k in train)
    msg = f"epoch {record['epoch']}: train loss {train['loss']:.2f}" + (f" ({parts})" if parts else "")
    if "eval/loss" in record:
        msg += f", eval loss {record['eval/loss']:.2f}"
    if record["skipped_steps"]:
        msg += f", {record['skipped_steps']} non-finite steps skipped so far"
    return msg + f", {record['img_per_s']:.1f} img/s"
