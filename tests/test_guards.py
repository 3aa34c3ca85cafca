"""Nothing diverging in silence: finite divergence stops a run before its weights are saved; a
resume that changes the architecture or the preprocessing is refused naming each key; a start
that fails leaves no litter; messages never print None for a missing checkpoint."""

import json
from dataclasses import replace

import pytest
import torch

from imgvae.commands.cli import main
from imgvae.io.checkpoint import load_checkpoint
from imgvae.runtime import RunError
from imgvae.train.engine import train
from imgvae.train.task import Callback

from conftest import TINY, tiny_config, write_jpegs


class Blow(Callback):
    """Inputs x 1e5 from step `at` on: a finite loss some 1e10 times larger (divergence)."""

    def __init__(self, at):
        self.at = at

    def on_inputs(self, inputs, step):
        return replace(inputs, x=inputs.x * 1e5) if step >= self.at else inputs


class Poison(Callback):
    def on_inputs(self, inputs, step):
        return replace(inputs, x=torch.full_like(inputs.x, float("nan")))


@pytest.fixture
def photos(tmp_path):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    return tmp_path / "photos"


def test_finite_divergence_stops_before_the_diverged_weights_are_saved(tmp_path, photos):
    cfg = tiny_config([photos], [], "train.epochs=3")
    with pytest.raises(RunError) as e:
        train(cfg, tmp_path / "run", progress=False, callbacks=[Blow(at=6)])
    message = str(e.value)
    assert "diverged at step 7: loss" in message and "x its running median" in message, message
    assert "train.divergence_factor=1e+08" in message and "train.lr=0.001, train.optimizer=rmsprop" in message
    assert "loss.beta=1" in message and "train.batch_size=8" in message and "\n" not in message
    state = load_checkpoint(tmp_path / "run")[1]
    assert state["step"] == 6 and str(tmp_path / "run" / "checkpoints" / "epoch_002") in message  # `last` kept
    off = train(tiny_config([photos], [], "train.epochs=3", "train.divergence_factor=0"), tmp_path / "off",
                progress=False, callbacks=[Blow(at=6)])
    assert off["steps"] == 9  # with the watch off, the run goes on


def test_too_many_bad_steps_before_any_checkpoint_say_so_without_none(tmp_path, photos):
    with pytest.raises(RunError) as e:
        train(tiny_config([photos], [], "train.max_bad_steps=1"), tmp_path / "run", progress=False,
              callbacks=[Poison()])
    assert "last good checkpoint kept: none (no checkpoint was written yet)" in str(e.value)
    assert "None" not in str(e.value)


def test_a_resume_that_changes_the_architecture_or_preprocessing_is_refused_naming_each_key(tmp_path, photos, capsys):
    run = tmp_path / "run"
    args = ["train", "-o", str(run), "--no-progress", *TINY, "train.epochs=1", f"data.train=[{photos}]", "data.eval=[]"]
    assert main(args) == 0
    for change, said in [(["model.name=kl-f8"], "model.name: 'seed' -> 'kl-f8'"),
                         (["data.image_size=64"], "data.image_size: 32 -> 64"),
                         (["model.latent_dim=8", "data.crop_size=100"],
                          "model.latent_dim: 16 -> 8; data.crop_size: 64 -> 100")]:
        assert main(["train", "--resume", str(run), "--no-progress", *change]) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgvae: error: --resume cannot change what the run was made with") and said in err, err
    assert main(["train", "--resume", str(run), "--no-progress", "train.epochs=2", "train.lr=5e-4"]) == 0  # allowed
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_a_start_that_fails_leaves_no_litter(tmp_path, photos, capsys):
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--no-progress", *TINY, f"data.train=[{tmp_path / 'nowhere'}]"]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    out.mkdir()  # a folder the user made stays, empty
    assert main(["train", "-o", str(out), "--no-progress", *TINY, f"data.train=[{tmp_path / 'nowhere'}]"]) == 2
    assert out.is_dir() and not list(out.iterdir())
    assert main(["train", "-o", str(out), "--no-progress", *TINY, "train.epochs=1", f"data.train=[{photos}]",
                 "data.eval=[]"]) == 0
    assert not (out / ".lock").exists()  # a finished run keeps no lock file either
