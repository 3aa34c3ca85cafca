"""Run folders written by earlier imgvae versions still load, evaluate the same and resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.io.checkpoint import load_checkpoint
from imgvae.io.paths import load_model, load_prior

from conftest import write_jpegs

FIXTURES = Path(__file__).parent / "fixtures"  # tests/fixtures/README.md says how they were made
# 0.1.0 before the eval / prior sections; main at 890cfa0, before the sub-packages and the
# per-architecture model configs.
RUNS = ["run_v0_1", "run_890cfa0"]


@pytest.fixture(params=RUNS)
def old_run(tmp_path, request):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / request.param, run, symlinks=True)
    write_jpegs(tmp_path / "photos", 8, seed=1)  # the photos it was trained and evaluated on
    return run, tmp_path / "photos"


def test_old_checkpoint_loads_with_its_ema_and_prior(old_run):
    run, _ = old_run
    model, cfg = load_model(run)
    assert (cfg.model.name, cfg.data.image_size, cfg.model.latent_dim) == ("resnet", 16, 4)
    ema = load_file(str(run / "checkpoints" / "last" / "ema.safetensors"))
    assert torch.equal(model.log_scale.detach(), ema["log_scale"])
    assert load_prior(run).images == 8


def test_old_run_evaluates_to_its_recorded_metrics(old_run, tmp_path):
    run, photos = old_run
    out = tmp_path / "metrics.json"
    args = ["evaluate", str(run), "--data", str(photos), "--batch-size", "4", "-o", str(out), "--no-progress"]
    assert main(args) == 0
    now, then = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    assert now["images"] == then["images"] == 8
    for group, key in [("reconstruction", "psnr"), ("reconstruction", "ssim")]:
        assert now[group][key]["mean"] == pytest.approx(then[group][key]["mean"], rel=1e-6)
    for key in ("neg_elbo_nats", "neg_iw_nats"):
        assert now["likelihood"][key] == pytest.approx(then["likelihood"][key], rel=1e-6)
    for key in ("fd_effnet_recon", "fd_effnet_samples", "fd_effnet_samples_fitted"):
        assert now["distribution"][key] == pytest.approx(then["distribution"][key], rel=1e-4)


def test_old_run_resumes(old_run, tmp_path):
    run, photos = old_run
    assert main(["train", "--resume", str(run), "-l", str(tmp_path / "logs"), "--no-progress",
                 f"data.train=[{photos}]", f"data.eval=[{photos}]", "train.epochs=2"]) == 0
    state = load_checkpoint(run)[1]
    assert (state["epoch"], state["step"]) == (2, 4)
    assert [json.loads(line)["epoch"] for line in (run / "history.jsonl").read_text().splitlines()] == [1, 2]
