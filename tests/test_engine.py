"""One engine for any model: a model that is not a VAE (a linear regression on random tensors)
trains through the same engine as `imgvae train`, with its checkpoints, resume, EMA,
non-finite skipping, time limit and records."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from imgvae.config import TrainConfig
from imgvae.io.checkpoint import load_checkpoint
from imgvae.train.engine import fit
from imgvae.train.task import Callback

D, N = 6, 96
RECIPE = TrainConfig(epochs=3, batch_size=8, optimizer="adam", lr=0.5, lr_gamma=1.0, device="cpu",
                     precision="fp32", log_every=1, ckpt_every=1, ckpt_every_steps=1, ema=0.5)


class TensorBatches:
    """Rows of one tensor, in a shuffled order per epoch (a function of the epoch), resumable."""

    def __init__(self, rows: torch.Tensor, batch_size: int):
        self.rows, self.batch_size, self.wait = rows, batch_size, 0.0
        self.per_epoch = len(rows) // batch_size

    def start_epoch(self, epoch: int, batches_done: int):
        self.order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(epoch))
        self.done = batches_done

    def __len__(self):
        return self.per_epoch - self.done

    def __iter__(self):
        for b in range(self.done, self.per_epoch):
            yield self.rows[self.order[b * self.batch_size:(b + 1) * self.batch_size]]

    def summary(self):
        return {}


class Regression:
    """y = x . w + noise, fitted by a linear layer: a task of the engine that is not a VAE."""

    name, picture_columns, adversary, epochs_key = "regression", 1, None, "train.epochs"

    def __init__(self, tc: TrainConfig, procs):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(N, D, generator=generator)
        y = x @ torch.arange(1.0, D + 1) + 0.01 * torch.randn(N, generator=generator)
        self.rows, self.tc, self.device = torch.cat([x, y[:, None]], 1), tc, procs.device

    def config_dict(self):
        return {"task": "regression", "train": {"epochs": self.tc.epochs, "lr": self.tc.lr}}

    def batches(self):
        return TensorBatches(self.rows, self.tc.batch_size)

    def build_model(self, fresh):
        return torch.nn.Linear(D, 1).to(self.device)

    def inputs(self, batch, micro):
        return batch.to(self.device)

    def batch_size(self, inputs):
        return len(inputs)

    def forward(self, model, inputs):
        return model(inputs[:, :D])

    def loss(self, inputs, output, micro):
        mse = (output.float()[:, 0] - inputs[:, D]).pow(2).mean()
        return mse, {"loss": mse.detach()}

    def train_mode(self, model):
        model.train()

    def begin(self):
        pass

    def end_epoch(self, model, epoch):
        with torch.no_grad():
            mse = (model(self.rows[:, :D])[:, 0] - self.rows[:, D]).pow(2).mean().item()
        return {"loss": mse}, {}

    def describe(self):
        return f"{N} random rows"

    def summary(self, out):
        return {}

    def likely_keys(self):
        return f"lr={self.tc.lr}"

    def resume_command(self, out):
        return f"resume {out}"


class CrashAfter(Callback):
    def __init__(self, name):
        self.name = name

    def on_checkpoint(self, name):
        if name == self.name:
            raise KeyboardInterrupt


class NaNAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_inputs(self, inputs, step):
        return torch.full_like(inputs, float("nan")) if step == self.step else inputs


def weights(run):
    return {k: v for k, v in load_file(str(run / "checkpoints" / "last" / "model.safetensors")).items()}


def test_a_regression_trains_through_the_engine_and_its_loss_falls(tmp_path):
    summary = fit(Regression, RECIPE, tmp_path / "run", progress=False)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 * (N // 8) and summary["epochs"] == 3
    assert history[-1]["train/loss"] < history[0]["train/loss"] / 4
    assert history[-1]["eval/loss"] < history[0]["eval/loss"]
    assert (tmp_path / "run" / "checkpoints" / "last" / "ema.safetensors").is_file()  # the engine's EMA
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["parameters"] == D + 1


def test_a_killed_regression_resumes_to_the_weights_of_a_straight_run(tmp_path):
    fit(Regression, RECIPE, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(Regression, RECIPE, tmp_path / "resumed", progress=False, callbacks=[CrashAfter("step_00000017")])
    state = load_checkpoint(tmp_path / "resumed")[1]
    assert (state["epoch"], state["step"], state["batches_done"]) == (1, 17, 5)  # mid-epoch 2
    summary = fit(Regression, RECIPE, tmp_path / "resumed", resume=True, progress=False)
    assert summary["steps"] == 36
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_non_finite_regression_step_is_skipped_and_a_time_limit_stops_it(tmp_path):
    summary = fit(Regression, RECIPE, tmp_path / "run", progress=False, callbacks=[NaNAt(4)])
    assert summary["skipped_steps"] == 1 and all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())
    summary = fit(Regression, replace(RECIPE, time_limit=1e-6), tmp_path / "late", progress=False)
    assert summary["steps"] == 1 and (tmp_path / "late" / "checkpoints" / "step_00000001").is_dir()
