"""The CUDA paths, on a GPU: skipped where there is none. Run them on every CUDA machine:

    PYTHONPATH=src python -m pytest -q tests/test_cuda.py
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from imgvae.commands.cli import main
from imgvae.config import DataConfig, load_config
from imgvae.data.cache import prepare
from imgvae.data.datasets import build_dataset
from imgvae.data.loading import Prefetched, make_loader
from imgvae.io.checkpoint import load_checkpoint
from imgvae.rundir import read_jsonl
from imgvae.train.engine import train
from imgvae.train.task import Callback
from test_robust import GAN, RESNET, Poison, assert_same_weights, weights

from conftest import TINY, tiny_config, write_jpegs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 without TF32 unless a test says otherwise (train.precision=auto is bf16 on GPUs that
# have it), so that runs compare tightly.
CUDA = ["train.device=cuda", "train.precision=fp32", "train.tf32=false"]


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
def test_a_non_finite_step_is_skipped_on_cuda(tmp_path, photos, optimizer):
    summary = train(tiny_config([photos], [], *CUDA, "train.epochs=1", f"train.optimizer={optimizer}",
                                "train.ema=0.9"), tmp_path / "run", progress=False,
                    callbacks=[Poison(lambda n: n == 2)])
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


class Strict(Callback):
    """CUDA's sync debug mode on for the whole of each optimiser step (its micro-batches, the
    optimiser, the EMA and the discriminator's step)."""

    def on_step_start(self, state):
        torch.cuda.set_sync_debug_mode("error")

    def on_step_end(self, state):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("extra", [[], GAN])
def test_the_step_never_waits_for_the_gpu_between_log_points(tmp_path, photos, extra):
    """CUDA's sync debug mode raises on any host sync inside a step (fused Adam; logging off)."""
    try:
        summary = train(tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=1", "train.ema=0.9",
                                    "train.log_every=100", "train.ckpt_every=0", *extra), tmp_path / "run",
                        progress=False, callbacks=[Strict()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
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


def test_precision_auto_is_bf16_on_cuda_and_recorded(tmp_path, photos):
    train(tiny_config([photos], [], "train.device=cuda", "train.epochs=1"), tmp_path / "auto", progress=False)
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]["precision"]
    assert saved == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert load_config("seed").train.precision == "fp32"  # the original recipe stays fp32


@pytest.mark.parametrize("accum", [1, 2])  # 2: gradients of two graph replays are added up
def test_cuda_graphs_compile_mode_trains_like_eager(tmp_path, photos, accum):
    runs = {}
    for mode in (None, "reduce-overhead"):
        compiled = ["train.compile=true", f"train.compile_mode={mode}"] if mode else []
        cfg = tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=2", f"train.grad_accum={accum}", *compiled)
        train(cfg, tmp_path / str(mode), progress=False)
        runs[mode] = [record["loss"] for record in read_jsonl(tmp_path / str(mode) / "steps.jsonl")]
    assert runs["reduce-overhead"] == pytest.approx(runs[None], rel=1e-3)


def test_views_kept_in_ram_go_to_the_gpu_and_train_like_the_loader(tmp_path, photos, capsys):
    for name, budget in (("loader", "0"), ("resident", "auto")):
        train(tiny_config([photos], [], *CUDA, *RESNET, "train.epochs=3", f"data.device_cache_gb={budget}"),
              tmp_path / name, progress=False)
        assert ("batching them on cuda" in capsys.readouterr().out) == (name == "resident")
    assert_same_weights(tmp_path / "loader", tmp_path / "resident", exact=False)


def test_prefetched_batches_are_the_loaders_on_the_gpu(photos):
    cfg = load_config(None, TINY + [f"data.train=[{photos}]"]).data
    dataset = build_dataset([str(photos)], cfg, train=True, seed=0)
    loader, sampler = make_loader(dataset, 4, True, seed=0, num_workers=0, pin_memory=True)
    sampler.set_epoch(1)
    expected = [(x.clone(), i) for x, i, _ in loader]
    got = list(Prefetched(loader, torch.device("cuda")))
    assert len(got) == len(expected) == len(loader)
    for (x, i), (y, j, bad) in zip(expected, got):
        assert y.is_cuda and torch.equal(x, y.cpu()) and torch.equal(i, j) and bad == []


def test_prepare_with_nvjpeg_is_close_to_pil_and_skips_the_same_files(tmp_path, photos, capsys):
    whole = next(photos.glob("*.jpg")).read_bytes()
    (photos / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (photos / "page.jpg").write_text("<html></html>")
    assert main(["prepare", "-o", str(tmp_path / "gpu"), "--no-progress", f"data.train=[{photos}]",
                 "data.image_size=32", "data.crop_size=64"]) == 0  # --device auto: the GPU
    gpu = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    cpu = prepare([str(photos)], DataConfig(image_size=32, crop_size=64, exact_decode=True), tmp_path / "cpu",
                  workers=1, progress=False)
    assert gpu["decoder"].startswith("torchvision decode_jpeg on cuda")
    assert gpu["skipped"] == cpu["skipped"] and len(cpu["skipped"]) == 2
    a, b = (np.load(tmp_path / name / "images.npy").astype(np.float64) for name in ("gpu", "cpu"))
    assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 35


def test_the_step_copies_nothing_from_pageable_host_memory(tmp_path, photos):
    """A copy from pageable host memory makes the host wait for the GPU (CUDA stages it), which
    sync debug mode does not report; the CUDA profiler names such copies."""
    with profile(activities=[ProfilerActivity.CUDA]) as calibration:
        torch.ones(1000).to("cuda", non_blocking=True)
        torch.cuda.synchronize()
    assert any("Pageable" in e.name for e in calibration.events()), [e.name for e in calibration.events()]
    names = []

    class Profiled(Callback):
        def on_step_start(self, state):
            self.prof = profile(activities=[ProfilerActivity.CUDA])
            self.prof.__enter__()

        def on_step_end(self, state):
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            names.extend(e.name for e in self.prof.events())
    assert main(["prepare", "-o", str(tmp_path / "cache"), "--no-progress", "--device", "cpu",
                 f"data.train=[{photos}]", "data.image_size=32", "data.crop_size=64"]) == 0
    summary = train(tiny_config([tmp_path / "cache"], [], *CUDA, *RESNET, "train.epochs=1", "train.ema=0.9",
                                "train.log_every=100"), tmp_path / "run", progress=False, callbacks=[Profiled()])
    assert summary["steps"] == 3 and names
    assert not [n for n in names if "Pageable" in n]
