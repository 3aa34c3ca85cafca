import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imgvae.commands.cli import main
from imgvae.config import load_config
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import to_model_input
from imgvae.io.checkpoint import CheckpointError, load_checkpoint, load_weights
from imgvae.models.losses import vae_loss
from imgvae.models.registry import build_model
from imgvae.train.engine import RunError, lock_run, train

from conftest import TINY, tiny_config, write_jpegs


def weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_cli_end_to_end_on_coco_zips_writes_every_output(tmp_path, coco_zips, capsys):
    out, logs = tmp_path / "run", tmp_path / "logs"
    code = main([
        "train", "-o", str(out), "-l", str(logs), "--seed", "3", "--no-progress", *TINY,
        f"data.train=[{coco_zips['train2017']},{coco_zips['test2017']}]", f"data.eval=[{coco_zips['val2017']}]",
        "data.num_workers=2", "train.epochs=2", "train.optimizer=adam", "train.lr=3e-4",
    ])
    assert code == 0
    for epoch in (1, 2):
        for kind in ("ground_truth", "reconstructions", "samples"):
            grid = Image.open(out / "grids" / f"epoch_{epoch:03d}_{kind}.png")
            assert grid.size == (2 * 32 + 3 * 2,) * 2  # 2x2 images of 32 px with 2 px padding
    for name in ("config.yaml", "history.jsonl", "summary.json", "checkpoints/last/model.safetensors",
                 "checkpoints/last/state.pt", "checkpoints/epoch_001/state.pt"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h[k]) for h in history for k in ("train/loss", "train/kl", "eval/loss"))
    # Loss on one fixed batch: the initial weights (rebuilt from the seed) vs the trained ones.
    cfg = load_config(out / "config.yaml")
    dataset = build_dataset(cfg.data.train, cfg.data, train=False, seed=3)
    x = to_model_input(torch.stack([dataset.load(i) for i in range(8)]), torch.device("cpu"))
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.data.image_size)
    before = vae_loss(x, model(x, sample=False), cfg.loss)[0].item()
    load_weights(model, weights(out), out)
    after = vae_loss(x, model(x, sample=False), cfg.loss)[0].item()
    assert after < 0.8 * before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * (24 // 8) and summary["skipped_files"] == 0
    state = load_checkpoint(out)[1]
    assert state["epoch"] == 2 and state["config"]["train"]["seed"] == 3
    assert "epoch 2: train loss" in capsys.readouterr().out


def test_two_epochs_plus_resume_equal_four_straight(tmp_path, image_folder):
    cfg4 = tiny_config([image_folder], [image_folder], "train.epochs=4", "train.ckpt_every=0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg4, straight, progress=False)
    train(tiny_config([image_folder], [image_folder], "train.epochs=2", "train.ckpt_every=0"), resumed, progress=False)
    assert main(["train", "--resume", str(resumed), "--no-progress", "train.epochs=4"]) == 0
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load_checkpoint(resumed)[1]["step"] == load_checkpoint(straight)[1]["step"] == 4 * 3
    assert len((resumed / "history.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["epoch_004", "last"]


def test_bad_files_are_counted_and_the_run_goes_on(tmp_path):
    data = tmp_path / "data"
    write_jpegs(data, 16)
    (data / "zero.jpg").write_bytes(b"")
    (data / "junk.jpg").write_text("not a jpeg")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        summary = train(tiny_config([data], [], "train.epochs=1"), tmp_path / "run", progress=False)
    assert summary["skipped_files"] == 2
    assert sorted(k.rsplit("/", 1)[1] for k in summary["skipped"]) == ["junk.jpg", "zero.jpg"]


def test_occupied_output_folder_is_refused(tmp_path, image_folder, capsys):
    cfg = tiny_config([image_folder], [], "train.epochs=1")
    train(cfg, tmp_path / "run", progress=False)
    before = weights(tmp_path / "run")
    with pytest.raises(RunError, match="already holds a run; continue it with imgvae train --resume"):
        train(cfg, tmp_path / "run", progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path / "run").items())
    handle = lock_run(tmp_path / "run")  # a live run holds the lock
    try:
        with pytest.raises(RunError, match="another imgvae run is writing"):
            train(cfg, tmp_path / "run", resume=True, progress=False)
    finally:
        handle.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train"], "needs -o OUT"),
        (["train", "--resume", "nowhere"], "is not a run folder"),
        (["train", "-o", "x", "data.train=[/no/such/dir]"], "does not exist"),
        (["train", "-o", "x", "train.batch_size=-1"], "train.batch_size must be > 0"),
        (["train", "-o", "x", "--config", "nope"], "neither a file nor a preset"),
        (["train", "-o", "x", "--device", "cuda:7", *TINY, "data.train=[embedded:train]"], None),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if message is None:  # CUDA: an error here, a run on a GPU machine
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        message = "CUDA is not available"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgvae: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_untrusted_checkpoint_files_are_refused(tmp_path, image_folder):
    run = tmp_path / "run"
    train(tiny_config([image_folder], [], "train.epochs=1"), run, progress=False)
    ckpt = run / "checkpoints" / "last"
    state = (ckpt / "state.pt").read_bytes()

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"format_version": 1, "x": Exploit()}, ckpt / "state.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        load_checkpoint(run)
    assert not (tmp_path / "pwned").exists()
    (ckpt / "state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        load_checkpoint(run)
    (ckpt / "state.pt").write_bytes(state)
    weights_bytes = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights_bytes[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "imgvae", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume OUT" in result.stdout and "KEY=VALUE" in result.stdout


def test_memory_cache_budget_is_shared_by_a_machines_processes(tmp_path, image_folder, capsys, monkeypatch):
    # 107 KB; 24 views need 74 KB
    cfg = tiny_config([image_folder], [], "train.epochs=1", "data.memory_cache_gb=0.0001")
    train(cfg, tmp_path / "one", progress=False)
    assert "training views kept in RAM" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # a quarter each: too little
    train(cfg, tmp_path / "four", progress=False)
    assert "training views kept in RAM" not in capsys.readouterr().out
