"""Scaling and robustness: mid-epoch resume, SIGKILL, NaN skipping, clipping,
gradient accumulation, DDP over 2 gloo processes, mixed precision."""

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from imgvae.commands.cli import main
from imgvae.config import LossConfig, TrainConfig
from imgvae.io.checkpoint import load_checkpoint
from imgvae.runtime import RunError
from imgvae.train.adversary import Adversary
from imgvae.train.engine import train
from imgvae.train.optim import build_optimizer, step_where
from imgvae.train.task import Callback

from conftest import TINY, tiny_config, tiny_train_args, write_jpegs

# A BatchNorm-free model: one image's gradient does not depend on its batch-mates,
# so accumulation and DDP must reproduce one large batch.
RESNET = ["model.name=resnet", "model.base_channels=8", "model.levels=2", "train.optimizer=adam", "train.lr=1e-3"]


def weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def assert_same_weights(a, b, exact=True):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture
def photos(tmp_path):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    return tmp_path / "photos"


class Poison(Callback):
    """NaN model inputs for the micro-batches whose number (1, 2, ...) `when` picks."""

    def __init__(self, when):
        self.when, self.calls = when, 0

    def on_inputs(self, inputs, step):
        self.calls += 1
        return replace(inputs, x=torch.full_like(inputs.x, float("nan"))) if self.when(self.calls) else inputs


class CrashAt(Callback):
    """A crash (KeyboardInterrupt) right after checkpoint `after` was written, or before any is."""

    def __init__(self, after=None):
        self.after = after

    def before_checkpoint(self, name):
        if self.after is None:
            raise KeyboardInterrupt

    def on_checkpoint(self, name):
        if name == self.after:
            raise KeyboardInterrupt


def test_mid_epoch_resume_equals_a_straight_run(tmp_path, photos):
    cfg = tiny_config([photos], [], "train.epochs=2", "train.ckpt_every_steps=1")
    train(cfg, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False, callbacks=[CrashAt("step_00000004")])
    state = load_checkpoint(tmp_path / "resumed")[1]
    assert (state["epoch"], state["step"], state["batches_done"]) == (1, 4, 1)  # 3 steps per epoch
    summary = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert summary["steps"] == 6
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "steps.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def kill_and_resume(tmp_path, photos, attempts: int, seed: int, most_wait: float) -> None:
    """SIGKILL a training process `attempts` times in a row at random moments, resuming each time,
    then finish: at most one checkpoint interval is lost each time, and the weights equal a
    straight run's."""
    every = 2
    args = ["train.epochs=4", f"train.ckpt_every_steps={every}"]  # 12 steps
    out = tmp_path / "killed"
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for attempt in range(attempts):
        resume = [sys.executable, "-m", "imgvae", "train", "--resume", str(out), "--no-progress"]
        cmd = [sys.executable, "-m", "imgvae", *tiny_train_args(out, photos, *args)] if attempt == 0 else resume
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 60
        while not (out / "steps.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, most_wait))  # mid-step, mid-epoch, mid-checkpoint-write, mid-switch to RAM views
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / "checkpoints" / "last").exists():
            continue
        state = load_checkpoint(out)[1]  # the newest checkpoint always loads
        logged = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
        assert max(logged) - state["step"] <= every  # at most one interval lost
    subprocess.run([sys.executable, "-m", "imgvae", "train", "--resume", str(out), "--no-progress"], check=True,
                   capture_output=True, env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["epochs"] == 4
    straight = tmp_path / "straight"
    assert main(tiny_train_args(straight, photos, *args)) == 0  # in this process: the same weights, sooner
    assert_same_weights(out, straight)


def test_chaos_ten_kills_in_a_row_end_with_the_weights_of_a_straight_run(tmp_path, photos):
    """Ten SIGKILLs in a row, each at a random moment of the resumed run: its first steps, a
    checkpoint being written (every 2 steps), the switch to views batched on the device (epoch 2)."""
    kill_and_resume(tmp_path, photos, attempts=10, seed=1, most_wait=1.5)


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, photos):
    cfg = tiny_config([photos], [], "train.epochs=1")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False, callbacks=[CrashAt()])
    assert not (tmp_path / "run" / "checkpoints").exists() and (tmp_path / "run" / "steps.jsonl").exists()
    summary = train(cfg, tmp_path / "run", resume=True, progress=False)
    train(cfg, tmp_path / "straight", progress=False)
    assert summary["steps"] == 3
    assert_same_weights(tmp_path / "run", tmp_path / "straight")
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # the first attempt's records were dropped


def test_leftover_temp_checkpoint_from_a_crash_is_ignored(tmp_path, photos):
    cfg = tiny_config([photos], [], "train.epochs=1")
    train(cfg, tmp_path / "run", progress=False)
    partial = tmp_path / "run" / "checkpoints" / ".tmp-epoch_002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)  # killed while writing
    summary = train(tiny_config([photos], [], "train.epochs=2"), tmp_path / "run", resume=True, progress=False)
    assert summary["epochs"] == 2 and not partial.exists()


def test_nan_batches_are_skipped_and_weights_stay_finite(tmp_path, photos):
    summary = train(tiny_config([photos], [], "train.epochs=2"), tmp_path / "run", progress=False,
                    callbacks=[Poison(lambda n: n in (2, 3))])
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert all(r["train/loss"] == r["train/loss"] for r in history)  # no NaN in the epoch means


def test_too_many_nan_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(tmp_path, photos):
    cfg = tiny_config([photos], [], "train.epochs=2", "train.max_bad_steps=2", "train.ckpt_every_steps=1")
    message = "2 steps in a row had a non-finite loss or gradient .step 4.; stopped, last good checkpoint kept"
    with pytest.raises(RunError, match=message):
        train(cfg, tmp_path / "run", progress=False, callbacks=[Poison(lambda n: n >= 3)])
    state = load_checkpoint(tmp_path / "run")[1]
    assert state["step"] == 3  # steps 1, 2 applied; step 3 skipped and saved; step 4 stops
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


def test_gradient_clipping_bounds_the_applied_gradient(tmp_path, photos, monkeypatch):
    seen = []
    step = torch.optim.RMSprop.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.RMSprop, "step", recording_step)
    train(tiny_config([photos], [], "train.epochs=1", "train.grad_clip=0.5"), tmp_path / "run", progress=False)
    logged = [json.loads(line)["grad_norm"] for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(seen) == 3 and all(n <= 0.5 * 1.0001 for n in seen)
    assert all(n > 0.5 for n in logged)  # the raw norms were larger: clipping acted


def test_gradient_accumulation_equals_one_large_batch(tmp_path, photos):
    big = train(tiny_config([photos], [], *RESNET, "train.epochs=1"), tmp_path / "big", progress=False)
    accum = train(tiny_config([photos], [], *RESNET, "train.epochs=1", "train.batch_size=4", "train.grad_accum=2"),
                  tmp_path / "accum", progress=False)
    assert big["steps"] == accum["steps"] == 3
    assert_same_weights(tmp_path / "big", tmp_path / "accum", exact=False)


def _torchrun(out, photos, *extra, processes=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "imgvae", "train", "-o", str(out), "--no-progress", *TINY, *RESNET,
           f"data.train=[{photos}]", "data.eval=[]", "train.batch_size=4", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_two_gloo_processes_equal_one_process_and_resume(tmp_path, photos):
    _torchrun(tmp_path / "ddp", photos, "train.epochs=2")
    train(tiny_config([photos], [], *RESNET, "train.epochs=2"), tmp_path / "single", progress=False)  # batch 8 = 2 x 4
    assert_same_weights(tmp_path / "ddp", tmp_path / "single", exact=False)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert not (tmp_path / "ddp" / "checkpoints" / ".lock").exists()

    _torchrun(tmp_path / "ddp_resumed", photos, "train.epochs=1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "imgvae", "train", "--resume", str(tmp_path / "ddp_resumed"), "--no-progress", "train.epochs=2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert_same_weights(tmp_path / "ddp", tmp_path / "ddp_resumed", exact=False)


def test_two_gloo_processes_train_the_same_from_a_resident_cache(tmp_path, photos):
    assert main(["prepare", "-o", str(tmp_path / "cache"), "--no-progress", f"data.train=[{photos}]",
                 "data.image_size=32", "data.crop_size=64"]) == 0
    loader = _torchrun(tmp_path / "loader", tmp_path / "cache", "train.epochs=1", "data.device_cache_gb=0")
    resident = _torchrun(tmp_path / "resident", tmp_path / "cache", "train.epochs=1")
    assert "resident" not in loader.stdout and "training set resident on cpu" in resident.stdout
    assert_same_weights(tmp_path / "loader", tmp_path / "resident")


def test_torchrun_with_one_process_trains_under_ddp_like_a_plain_process(tmp_path, photos):
    result = _torchrun(tmp_path / "ddp1", photos, "train.epochs=1", "train.batch_size=8", processes=1)
    assert "x 1 processes" in result.stdout  # in the process group, alone
    train(tiny_config([photos], [], *RESNET, "train.epochs=1"), tmp_path / "single", progress=False)
    assert_same_weights(tmp_path / "ddp1", tmp_path / "single", exact=False)


def test_adversarial_loss_under_grad_accum_and_ddp_steps_the_discriminator_once_per_step(tmp_path, photos):
    gan = ["loss.adversarial=0.5", "loss.sigma=scalar", "train.epochs=1"]
    train(tiny_config([photos], [], *RESNET, *gan, "train.batch_size=4", "train.grad_accum=2"), tmp_path / "accum",
          progress=False)
    _torchrun(tmp_path / "ddp", photos, *gan)
    for run in (tmp_path / "accum", tmp_path / "ddp"):
        summary = json.loads((run / "summary.json").read_text())
        state = load_checkpoint(run)[1]
        d_steps = {int(s["step"]) for s in state["d_optimizer"]["state"].values()}
        assert summary["steps"] == 3 and d_steps == {3}, (run.name, d_steps)
        discriminator = load_file(str(run / "checkpoints" / "last" / "discriminator.safetensors"))
        assert all(torch.isfinite(w).all() for w in discriminator.values())
        logged = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["discriminator"]) and r["gan_weight"] > 0 for r in logged)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_train_with_finite_loss(tmp_path, photos, precision):
    cfg = tiny_config([photos], [], "train.epochs=1", f"train.precision={precision}", "train.channels_last=true",
                      "data.image_size=16")  # fp16 on CPU is emulated: keep it small
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 3 and summary["final"]["train/loss"] < 1e6
    assert all(w.dtype != torch.float16 and torch.isfinite(w).all() for w in weights(tmp_path / "run").values())
    state = load_checkpoint(tmp_path / "run")[1]
    assert state["scaler"]["scale"] > 0 if precision == "fp16" else state["scaler"] == {}
    assert state["config"]["train"]["precision"] == precision


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, photos):
    train(tiny_config([photos], [], *RESNET, "train.epochs=1"), tmp_path / "eager", progress=False)
    train(tiny_config([photos], [], *RESNET, "train.epochs=1", "train.compile=true"), tmp_path / "compiled",
          progress=False)
    assert_same_weights(tmp_path / "eager", tmp_path / "compiled", exact=False)


def test_time_limit_stops_at_a_step_with_a_resumable_checkpoint(tmp_path, photos):
    cfg = tiny_config([photos], [], "train.epochs=2", "train.time_limit=0.00001")  # under a millisecond
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 1 and (tmp_path / "run" / "checkpoints" / "step_00000001").is_dir()
    resumed = train(tiny_config([photos], [], "train.epochs=2"), tmp_path / "run", resume=True, progress=False)
    assert resumed["steps"] == 6 and resumed["epochs"] == 2


def test_keep_freed_memory_stops_page_faulting_large_blocks_in_again():
    # A fresh process each: the malloc setting is process-wide. Ten 64 MiB results, each
    # replacing the last, as activations do step after step: by default every one is a
    # fresh mmap (16,384 page faults each); kept, the freed blocks are reused.
    script = """
import resource, sys, torch
torch.set_num_threads(1)  # with 2 threads on a loaded machine, some blocks were still mapped afresh
from imgvae.train.precision import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(16 * 2**20)
y = x * 2
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    y = x * 2
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 150_000 and faults["keep"] < faults["default"] / 2, faults


def _run_state(state):
    """Every tensor a step may change: weights, BatchNorm buffers, optimiser state, EMA."""
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    for i, opt_state in enumerate(state.optimizer.state.values()):
        tensors |= {f"opt.{i}.{k}": v for k, v in opt_state.items() if torch.is_tensor(v)}
    if state.ema is not None:
        tensors |= {f"ema.{k}": v for k, v in state.ema.state_dict().items()}
    return {k: v.detach().clone() for k, v in tensors.items()}


class RecordStates(Callback):
    def __init__(self):
        self.states = []

    def on_step_end(self, state):
        self.states.append(_run_state(state))


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])  # host decision / fused Adam's skip on the device
def test_a_skipped_step_changes_nothing(tmp_path, photos, optimizer):
    recorder = RecordStates()
    states = recorder.states
    summary = train(tiny_config([photos], [], "train.epochs=1", f"train.optimizer={optimizer}", "train.ema=0.9"),
                    tmp_path / "run", progress=False, callbacks=[Poison(lambda n: n == 2), recorder])
    assert summary["skipped_steps"] == 1 and len(states) == 3
    assert any(k.startswith("model.") and "running_mean" in k for k in states[0])  # BatchNorm is there
    assert states[1].keys() == states[0].keys()
    for k in states[0]:
        assert torch.equal(states[1][k], states[0][k]), k  # step 2 was skipped
    assert any(not torch.equal(states[2][k], states[1][k]) for k in states[0])  # step 3 was not


class HostReads(TorchDispatchMode):
    """Every op called from inside a training step that reads a tensor's value on the host:
    .item(), bool(), float(), .tolist(), and a tensor passed where torch wants a number all end in
    _local_scalar_dense; nonzero, masked_select and equal read values too. On a GPU, each one
    makes the host wait for the device."""

    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
             "aten.equal.default"}
    # Innermost frames of the engine's files (train/engine.py, state.py, vae.py, batches.py, task.py) that run
    # inside a step; settle, stop votes and logging are the sync points, outside.
    FILES = ("/imgvae/train/engine.py", "/imgvae/train/state.py", "/imgvae/train/vae.py", "/imgvae/train/batches.py",
             "/imgvae/train/task.py")
    INSIDE_STEP = {"run", "step", "_micro_step", "_apply", "inputs", "forward", "loss", "adversary_pair", "steps",
                   "__iter__", "step_randomness", "step_generator", "global_positions", "advance"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.READS:
            stack = traceback.extract_stack()
            frames = [f for f in stack if f.filename.endswith(self.FILES)]
            loading = any("torch/utils/data" in f.filename for f in stack)  # the loader's own CPU tensors
            if frames and frames[-1].name in self.INSIDE_STEP and not loading:
                caller = next(f for f in reversed(stack[:-1]) if "torch/" not in f.filename)  # ours, not torch's
                self.reads.append(f"{func} in {frames[-1].name}: {caller.filename}:{caller.lineno} {caller.line}")
        return func(*args, **(kwargs or {}))


GAN = ["loss.adversarial=0.1", "loss.adversarial_start=0"]


@pytest.mark.parametrize("optimizer, extra, reads_per_step", [
    ("adam", [], 0), ("adam", GAN, 0), ("rmsprop", [], 1),
    ("adam", [*RESNET, "train.epochs=1", "train.precision=fp16", "train.grad_accum=2", "train.grad_clip=1"], 0),
    ("adam", ["train.epochs=1", "model.name=kl-f8", "model.base_channels=16", "loss.perceptual=0.1",
              "train.precision=bf16"], 0)])
def test_steps_wait_for_the_device_only_when_they_log(tmp_path, photos, optimizer, extra, reads_per_step):
    """Between log points a step reads nothing on the host with fused Adam (with the EMA, the GAN's
    discriminator, fp16's GradScaler, accumulation, clipping, a perceptual loss), or one flag with
    other optimisers (the skip decision, on a CPU only)."""
    with HostReads() as host:
        summary = train(tiny_config([photos], [], "train.epochs=2", f"train.optimizer={optimizer}", "train.ema=0.9",
                                    "train.log_every=100", "train.ckpt_every=0", *extra), tmp_path / "run",
                        progress=False)
    assert summary["steps"] >= 2
    assert len(host.reads) == summary["steps"] * reads_per_step, host.reads


def test_the_discriminator_skips_a_non_finite_step_and_takes_the_next():
    torch.manual_seed(0)
    adversary = Adversary(LossConfig(adversarial=0.1), "fp32", torch.device("cpu"))
    real, fake = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    params = list(adversary.discriminator.parameters())
    before = [p.detach().clone() for p in params]
    adversary.accumulate(real, fake, 1.0)
    params[0].grad.view(-1)[0] = float("nan")
    adversary.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(state["step"] == 0 and not state["exp_avg"].any() for state in adversary.optimizer.state.values())
    adversary.accumulate(real, fake, 1.0)
    adversary.step()
    assert all(torch.isfinite(p).all() for p in params) and not torch.equal(params[0], before[0])


@pytest.mark.parametrize("applied", [True, False])
def test_step_where_applies_or_undoes_an_rmsprop_step_on_the_device(applied):
    """What a CUDA run does for RMSprop, which has no fused found_inf: the step, or nothing."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    twin = copy.deepcopy(model)
    opt, twin_opt = (build_optimizer(m, TrainConfig()) for m in (model, twin))
    for step in range(3):  # the first step creates the optimiser's state, the third reuses it
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
        step_where(opt, opt.step, torch.tensor(applied))
        if applied:
            twin_opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
        for a, b in zip(opt.state.values(), twin_opt.state.values() if applied else []):
            assert torch.equal(a["square_avg"], b["square_avg"])
        if not applied:
            assert all(not state["square_avg"].any() for state in opt.state.values())
