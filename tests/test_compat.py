"""Run folders written by earlier imgvae versions still load, evaluate the same and resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.io.checkpoint import load_checkpoint
from imgvae.io.paths import load_model
from imgvae.priors.gmm import load_prior

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
        assert now["distribution"][key] == pytest.approx(then["distribution"][key], rel=1e-6)


def test_old_run_resumes(old_run, tmp_path):
    run, photos = old_run
    assert main(["train", "--resume", str(run), "-l", str(tmp_path / "logs"), "--no-progress",
                 f"data.train=[{photos}]", f"data.eval=[{photos}]", "train.epochs=2"]) == 0
    state = load_checkpoint(run)[1]
    assert (state["epoch"], state["step"]) == (2, 4)
    assert [json.loads(line)["epoch"] for line in (run / "history.jsonl").read_text().splitlines()] == [1, 2]


# main at e789336 (2026-12-06), the last layout before the prior kinds had sections of their own: a
# kl-f4 run with a fitted prior and a flow prior, a vq-f4 run with a token prior (tests/fixtures/README.md).
PRIOR_RUNS = {"run_e789336_kl": ("flow", {"standard", "gmm", "flow"}), "run_e789336_vq": ("tokens", {"standard",
                                                                                                    "tokens"})}


@pytest.fixture(params=sorted(PRIOR_RUNS))
def prior_run(tmp_path, request, monkeypatch):
    """The run copied to tmp_path/run_kl or run_vq, with its photos, as it was made (in that folder)."""
    name = request.param
    run = tmp_path / f"run_{name.removeprefix('run_e789336_')}"
    shutil.copytree(FIXTURES / name, run, symlinks=True)
    write_jpegs(tmp_path / "photos", 8, seed=1)
    monkeypatch.chdir(tmp_path)
    return run, *PRIOR_RUNS[name]


def test_a_run_with_learned_priors_evaluates_to_its_recorded_figures(prior_run, tmp_path):
    run, _, priors = prior_run
    out = tmp_path / "metrics.json"
    assert main(["evaluate", run.name, "--no-progress", "--batch-size", "4", "eval.generation_images=12",
                 "-o", str(out)]) == 0
    now, then = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    assert now["reconstruction"]["psnr"]["mean"] == pytest.approx(then["reconstruction"]["psnr"]["mean"], rel=1e-6)
    assert now["likelihood"]["neg_elbo_nats"] == pytest.approx(then["likelihood"]["neg_elbo_nats"], rel=1e-6)
    for key, value in then["distribution"].items():
        assert key == "note" or now["distribution"][key] == pytest.approx(value, rel=1e-6), key
    assert set(now["generation"]["priors"]) == priors
    for name, scores in then["generation"]["priors"].items():
        assert now["generation"]["priors"][name]["fd_effnet"] == pytest.approx(scores["fd_effnet"], rel=1e-6), name


def test_a_learned_prior_from_before_its_own_section_samples_and_resumes(prior_run, tmp_path):
    run, kind, _ = prior_run
    assert main(["sample", run.name, "--prior", kind, "-n", "4", "-o", str(tmp_path / "s")]) == 0
    assert main(["train-prior", run.name, "--resume", "--no-progress", "prior.epochs=3"]) == 0
    state = load_checkpoint(run / f"prior-{kind}")[1]
    assert (state["epoch"], state["step"]) == (3, 12)  # 16 mirrored views, batches of 4
    saved = yaml.safe_load((run / f"prior-{kind}" / "config.yaml").read_text())
    assert "train" not in saved and saved["prior"]["kind"] == kind and saved["prior"]["precision"] == "fp32"
    assert main(["train", "--resume", run.name, "--no-progress", "train.epochs=2", "eval.after_training=false"]) == 0
    assert load_checkpoint(run)[1]["step"] == 4
