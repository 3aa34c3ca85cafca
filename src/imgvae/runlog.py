"""What a training run writes for people to read (rank 0 only): config.yaml, steps.jsonl,
history.jsonl, the per-epoch picture grids, TensorBoard scalars and images, summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from . import rundir
from .config import Config, save_config
from .sample import grid, save_grid


class RunLog:
    """The records of the run in `out`, from position (epoch, step) on: newer records, left by
    a run that stopped after its last checkpoint, are dropped; the resumed run writes them again."""

    def __init__(self, out: Path, logs: Path, cfg: Config, epoch: int, step: int):
        self.out = out
        save_config(cfg, out / rundir.CONFIG)
        rundir.truncate_jsonl(out / rundir.HISTORY, "epoch", epoch)
        rundir.truncate_jsonl(out / rundir.STEPS, "step", step)
        self.writer = SummaryWriter(str(logs))

    def step(self, step: int, epoch_float: float, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"train_step/{k}", v, step)
        rundir.append_jsonl(self.out / rundir.STEPS, {"step": step, "epoch_float": epoch_float, **values})

    def pictures(self, epoch: int, pictures: dict[str, torch.Tensor], nrow: int) -> None:
        """{kind: [0, 1] images (n, 3, S, S)} -> grids/epoch_NNN_<kind>.png and TensorBoard."""
        for kind, images in pictures.items():
            save_grid(images, nrow, rundir.epoch_grid(self.out, epoch, kind))
            self.writer.add_image(f"grids/{kind}", grid(images, nrow), epoch)

    def epoch(self, record: dict) -> None:
        """One line of history.jsonl; its losses, learning rate and speed to TensorBoard."""
        for k, v in record.items():
            if "/" in k or k in ("lr", "img_per_s"):
                self.writer.add_scalar(f"epoch/{k}", v, record["epoch"])
        self.writer.flush()
        rundir.append_jsonl(self.out / rundir.HISTORY, record)

    def summary(self, summary: dict) -> None:
        rundir.write_text_atomic(self.out / rundir.SUMMARY, json.dumps(summary, indent=2))

    def close(self) -> None:
        self.writer.close()
