"""The CUDA paths, on a GPU: skipped where there is none. Run them on every CUDA machine:

    PYTHONPATH=src python -m pytest -q tests/test_cuda.py
"""

import json
import subprocess
import sys

import pytest
import torch

from imgvae.checkpoint import load_checkpoint
from imgvae.cli import main
from imgvae.train import Trainer, train
from test_robust import RESNET, assert_same_weights, weights

from conftest import TINY, tiny_config, write_jpegs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = ["train.device=cuda"]


@pytest.fixture
def photos(tmp_path):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    return tmp_path / "photos"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_on_cuda(tmp_path, photos, precision):
    summary = train(tiny_config([photos], [photos], *CUDA, "train.epochs=2", f"train.precision={precision}",
                                "train.channels_last=true", "eval.after_training=true"), tmp_path / "run",
                    progress=False)
    assert summary["device"].startswith("cuda") and summary["steps"] == 6 and summary["skipped_steps"] == 0
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())
    if precision == "fp16":  # the GradScaler's state is saved for --resume
        assert load_checkpoint(tmp_path / "run")[1]["scaler"]["scale"] > 0


def test_compiled_training_follows_eager(tmp_path, photos):
    runs = {}
    for compiled in (False, True):
        cfg = tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=1", f"train.compile={compiled}")
        train(cfg, tmp_path / str(compiled), progress=False)
        runs[compiled] = [json.loads(line)["loss"] for line in
                          (tmp_path / str(compiled) / "steps.jsonl").read_text().splitlines()]
    assert runs[True] == pytest.approx(runs[False], rel=1e-3)


def test_resume_on_cuda_equals_a_straight_run(tmp_path, photos):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=2", "train.ema=0.9"), straight, progress=False)
    train(tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=1", "train.ema=0.9"), resumed, progress=False)
    train(tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=2", "train.ema=0.9"), resumed, resume=True,
          progress=False)
    assert_same_weights(straight, resumed, exact=False)  # cuDNN's backward kernels may sum in any order


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_a_non_finite_step_is_skipped_on_cuda(tmp_path, photos, monkeypatch, optimizer):
    real, calls = Trainer.model_input, {"n": 0}

    def poisoned(self, images, flips):
        calls["n"] += 1
        x = real(self, images, flips)
        return torch.full_like(x, float("nan")) if calls["n"] == 2 else x

    monkeypatch.setattr(Trainer, "model_input", poisoned)
    summary = train(tiny_config([photos], [], *CUDA, "train.epochs=1", f"train.optimizer={optimizer}",
                                "train.ema=0.9"), tmp_path / "run", progress=False)
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


def test_the_step_never_waits_for_the_gpu_between_log_points(tmp_path, photos, monkeypatch):
    """CUDA's sync debug mode raises on any host sync inside a step (fused Adam; logging off)."""
    for name in ("training_step", "optimizer_step"):
        real = getattr(Trainer, name)

        def strict(self, *args, _real=real, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _real(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        monkeypatch.setattr(Trainer, name, strict)
    summary = train(tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=1", "train.ema=0.9",
                                "train.log_every=100", "train.ckpt_every=0"), tmp_path / "run", progress=False)
    assert summary["steps"] == 3


def test_loader_workers_with_the_shared_memory_cache(tmp_path, photos):
    summary = train(tiny_config([photos], [], *CUDA, "train.epochs=2", "data.num_workers=2"), tmp_path / "run",
                    progress=False)
    assert summary["steps"] == 6 and summary["skipped_files"] == 0


def _torchrun(out, photos, processes, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "imgvae", "train", "-o", str(out), "--no-progress", *TINY, *CUDA, f"data.train=[{photos}]",
           "data.eval=[]", f"train.batch_size={8 // processes}", "train.epochs=2", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_ddp_over_nccl_with_one_process_and_sync_batchnorm(tmp_path, photos):
    """The seed model has BatchNorm: under DDP on GPUs it becomes SyncBatchNorm."""
    summary = _torchrun(tmp_path / "nccl", photos, 1)
    assert summary["processes"] == 1 and summary["steps"] == 6
    train(tiny_config([photos], [], *CUDA, "train.epochs=2"), tmp_path / "single", progress=False)
    assert_same_weights(tmp_path / "nccl", tmp_path / "single", exact=False)


def test_two_gloo_processes_on_cuda_tensors(tmp_path, photos):
    """Two processes on one GPU (NCCL needs a GPU each): gloo carries the CUDA tensors."""
    summary = _torchrun(tmp_path / "gloo", photos, 2, "train.dist_backend=gloo")
    assert summary["processes"] == 2 and summary["steps"] == 6
    train(tiny_config([photos], [], *CUDA, "train.epochs=2"), tmp_path / "single", progress=False)
    assert_same_weights(tmp_path / "gloo", tmp_path / "single", exact=False)


def test_the_resident_cache_on_the_gpu_follows_the_loader(tmp_path, photos, capsys):
    assert main(["prepare", "-o", str(tmp_path / "cache"), "--no-progress", f"data.train=[{photos}]",
                 "data.image_size=32", "data.crop_size=64"]) == 0
    for name, budget in (("loader", "0"), ("resident", "auto")):
        train(tiny_config([tmp_path / "cache"], [], *CUDA, *RESNET, "train.epochs=2", f"data.device_cache_gb={budget}"),
              tmp_path / name, progress=False)
        assert ("training set resident on cuda" in capsys.readouterr().out) == (name == "resident")
    assert_same_weights(tmp_path / "loader", tmp_path / "resident", exact=False)
