"""The faults a hostile user found, each held by a test: a diverged or NaN checkpoint never becomes
`last` nor crashes a verb; a copied run resumes into itself; a file name with a newline keeps its
row; a full disk and a second Ctrl-C say one true line; a cache's left-out files stay listed;
every hint a command prints works as printed."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from imgvae.commands.cli import main
from imgvae.data.sources import read_keys
from imgvae.io.checkpoint import load_checkpoint
from imgvae.runtime import RunError
from imgvae.train.engine import train
from imgvae.train.task import Callback

from conftest import TINY, tiny, tiny_config, tiny_train_args, train_tiny_run, write_jpegs

KL = ["model.name=kl-f4", "model.base_channels=4", "train.optimizer=adam", "train.epochs=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("faults"), *KL, "train.ema=0.9")


def nan_copy(run: Path, where: Path) -> Path:
    """The run copied with every weight of its last checkpoint NaN (a run that diverged for good)."""
    shutil.copytree(run, where, symlinks=True)
    for name in ("model.safetensors", "ema.safetensors"):
        file = where / "checkpoints" / "last" / name
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(file)).items()}, str(file))
    return where


def one_line_refusal(args: list[str], capsys, *texts: str) -> str:
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(t in err for t in texts), (args, err)
    return err


def test_a_nan_checkpoint_is_refused_by_every_verb_in_one_line(run, tmp_path, capsys):
    bad = nan_copy(run, tmp_path / "nan")
    photos = run.parent / "eval"
    out = tmp_path / "out"
    verbs = [["evaluate", str(bad), "--limit", "4"], ["sample", str(bad), "-n", "2", "-o", str(out)],
             ["reconstruct", str(bad), str(next(photos.iterdir())), "-o", str(out)],
             ["fit-prior", str(bad)], ["train-prior", str(bad), "-o", str(out)],
             ["encode", str(bad), "-o", str(out)], ["export", str(bad), "-o", str(out)],
             ["compare", str(run), f"nan={bad}", "--data", str(photos), "-o", str(out)],
             ["train", "-o", str(out), *tiny(*KL, f"model.pretrained={bad}"),
              f"data.train=[{run.parent / 'train'}]"]]
    for args in verbs:
        one_line_refusal(args, capsys, "NaN or infinite values", "diverged")
        assert not out.exists(), args
    assert main(["train", "--resume", str(bad), "--no-progress", "train.epochs=2"]) == 2
    assert "NaN or infinite values" in capsys.readouterr().err


class Overflow(Callback):
    """Blows the decoder's output layer up to finite but overflowing weights at one step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state):
        if state.position.step == self.step:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.mul_(1e30)


def test_a_checkpoint_whose_held_out_loss_is_not_finite_never_becomes_last(tmp_path):
    write_jpegs(tmp_path / "photos", 16, seed=1)
    cfg = tiny_config([tmp_path / "photos"], [tmp_path / "photos"], "train.epochs=3", "train.ckpt_every=1",
                      "train.divergence_factor=0")
    with pytest.raises(RunError, match=r"diverged at epoch 2: held-out .*nan.*; stopped without saving, last good "
                                       r"checkpoint kept: .*epoch_001"):
        train(cfg, tmp_path / "run", progress=False, callbacks=[Overflow(step=4)])  # epoch 2's last step
    assert (tmp_path / "run" / "checkpoints" / "last").resolve().name == "epoch_001"
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()] == [1]


def test_a_copied_run_resumes_into_its_own_folder(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    events = sorted(p.name for p in (run / "logs").iterdir())
    summary = json.loads((copy / "summary.json").read_text())
    assert (summary["checkpoint"], summary["logs"]) == ("checkpoints/last", "logs")
    assert main(["train", "--resume", str(copy), "--no-progress", "train.epochs=2"]) == 0
    assert sorted(p.name for p in (run / "logs").iterdir()) == events  # nothing written into the original
    assert len(list((copy / "logs").iterdir())) > len(events)
    assert load_checkpoint(copy)[1]["log_dir"] == "logs"


def test_an_older_runs_absolute_log_folder_is_its_copys_own(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    state_file = copy / "checkpoints" / "last" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["log_dir"] = str(run / "logs")  # as runs before relative paths recorded it
    torch.save(state, state_file)
    events = sorted(p.name for p in (run / "logs").iterdir())
    assert main(["train", "--resume", str(copy), "--no-progress", "train.epochs=2"]) == 0
    assert sorted(p.name for p in (run / "logs").iterdir()) == events


def test_any_file_name_keeps_its_row_through_prepare_and_encode(tmp_path, capsys):
    photos = tmp_path / "photos"
    paths = write_jpegs(photos, 6, seed=2)
    odd = photos / "new\nline_ünï😀.jpg"
    paths[2].rename(odd)
    assert main(["prepare", "-o", str(tmp_path / "cache"), f"data.train=[{photos}]", "data.image_size=16",
                 "data.crop=center", "data.crop_size=64", "--no-progress", "--workers", "1"]) == 0
    keys = read_keys(tmp_path / "cache")
    assert len(keys) == 6 and str(odd) in keys
    images = np.load(tmp_path / "cache" / "images.npy")
    run = train_tiny_run(tmp_path, "train.epochs=1", "data.image_size=16", "model.latent_dim=4", n_train=8, n_eval=2)
    assert main(["encode", str(run), "-o", str(tmp_path / "z"), "--data", str(tmp_path / "cache")]) == 0
    assert read_keys(tmp_path / "z") == keys and len(np.load(tmp_path / "z" / "latents.npy")) == len(images) == 6


def test_an_old_caches_keys_still_read(tmp_path):
    write_jpegs(tmp_path / "photos", 4, seed=2)
    assert main(["prepare", "-o", str(tmp_path / "cache"), f"data.train=[{tmp_path / 'photos'}]",
                 "data.image_size=16", "data.crop=center", "--no-progress", "--workers", "1"]) == 0
    keys = read_keys(tmp_path / "cache")
    (tmp_path / "cache" / "keys.json").unlink()
    (tmp_path / "cache" / "keys.txt").write_text("".join(k + "\n" for k in keys))  # caches before keys.json
    assert read_keys(tmp_path / "cache") == keys


def test_encode_on_a_cache_lists_the_files_the_cache_left_out(run, tmp_path, capsys):
    photos = tmp_path / "photos"
    write_jpegs(photos, 6, seed=3)
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "page.jpg").write_text("<html>404</html>")
    assert main(["prepare", "-o", str(tmp_path / "cache"), f"data.train=[{photos}]", "data.image_size=32",
                 "data.crop=center", "data.crop_size=64", "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["encode", str(run), "-o", str(tmp_path / "z"), "--data", str(tmp_path / "cache")]) == 0
    assert "(2 unreadable files left out, listed in manifest.json)" in capsys.readouterr().out
    skipped = json.loads((tmp_path / "z" / "manifest.json").read_text())["skipped"]
    assert sorted(Path(k).name for k in skipped) == ["empty.jpg", "page.jpg"]
    assert all("left out when" in reason for reason in skipped.values())


def test_an_unreadable_file_in_the_epochs_left_over_views_is_listed(tmp_path):
    photos = tmp_path / "photos"
    write_jpegs(photos, 16, seed=3)
    (photos / "empty.jpg").write_bytes(b"")  # 17 files, batches of 8: one view is left over each epoch
    args = tiny_train_args(tmp_path / "run", photos, "train.epochs=1", "train.seed=5")
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["images_seen_this_run"] == 16  # the empty file was the view left over: never in a batch
    assert [Path(k).name for k in summary["skipped"]] == ["empty.jpg"]


def test_a_corrupt_or_unsafe_state_file_is_one_line_without_torchs_advice(run, tmp_path, capsys):
    for name, payload in (("truncated", b"PK\x03\x04 truncated"), ("unsafe", None)):
        copy = tmp_path / name
        shutil.copytree(run, copy, symlinks=True)
        state = copy / "checkpoints" / "last" / "state.pt"
        if payload is None:
            torch.save({"format_version": 1, "evil": Path("/")}, state)  # an object weights_only refuses
        else:
            state.write_bytes(payload)
        err = one_line_refusal(["evaluate", str(copy)], capsys, "state.pt: refused or unreadable")
        assert "weights_only" not in err and "Weights only" not in err


def test_written_weights_are_readable_by_the_group_as_the_umask_says(run):
    for path in run.rglob("*.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask(), path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class InterruptAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state):
        if state.position.step == self.step:
            raise KeyboardInterrupt  # what a second Ctrl-C raises


@pytest.mark.parametrize("step, said", [(1, "interrupted before the first checkpoint: nothing to resume from"),
                                        (3, "interrupted; the last finished checkpoint is kept: ")])
def test_an_interruption_says_what_it_kept(tmp_path, step, said):
    write_jpegs(tmp_path / "photos", 16, seed=1)
    cfg = tiny_config([tmp_path / "photos"], [], "train.epochs=2")
    with pytest.raises(KeyboardInterrupt) as raised:
        train(cfg, tmp_path / "run", progress=False, callbacks=[InterruptAt(step)])
    assert raised.value.message.startswith(said)
    if step == 3:
        assert raised.value.message.endswith(f"epoch_001; continue with imgvae train --resume {tmp_path / 'run'}")


def run_printed(command: str) -> int:
    """A command as a message printed it, run through the command line."""
    words = shlex.split(command)
    assert words[0] == "imgvae", command
    return main(words[1:] + ["--no-progress"])


def test_every_resume_hint_works_as_printed(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    for args in (["train-prior", str(copy), "prior.epochs=50", "prior.width=8", "prior.batch_size=8",
                  "prior.time_limit=0.0001", "--no-progress"],
                 ["train-prior", str(copy), "-o", str(tmp_path / "other"), "prior.epochs=50", "prior.width=8",
                  "prior.batch_size=8", "prior.time_limit=0.0001", "--no-progress"],
                 ["train", "--resume", str(copy), "train.epochs=20", "train.time_limit=0.0001", "--no-progress"]):
        capsys.readouterr()
        assert main(args) == 0, args
        hint = re.search(r"continue with (imgvae [^;\n]*)", capsys.readouterr().out).group(1)
        assert run_printed(hint) == 0, hint
    assert main(["train", "-o", str(copy), *TINY]) == 2
    hint = re.search(r"continue it with (imgvae [^,\n]*)", capsys.readouterr().err).group(1)
    assert hint == f"imgvae train --resume {copy}"


def test_train_prior_help_says_what_the_default_backbone_is(capsys):
    with pytest.raises(SystemExit):
        main(["train-prior", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "diffusers' UNet for spatial latents" in help_text and "prior.time_limit" in help_text


def mounted_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "small"
    if shutil.which("mount") is None or not mounted_tmpfs(disk, "3m"):
        pytest.skip("mounting a tmpfs needs root here")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_prepare_onto_a_full_disk_says_so_in_one_line_and_resumes(tmp_path, small_disk, capsys):
    write_jpegs(tmp_path / "photos", 24, seed=1)  # 4.7 MB of 256 px views for a 3 MB disk
    args = ["prepare", "-o", str(small_disk / "cache"), f"data.train=[{tmp_path / 'photos'}]", "data.image_size=256",
            "data.crop=center", "--no-progress", "--workers", "1"]
    one_line_refusal(args, capsys, "No space left on device", "MB needed", "run the same command again")
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert main(args) == 0
    assert len(read_keys(small_disk / "cache")) == 24


def test_checkpoints_onto_a_full_disk_stop_in_one_line(tmp_path, small_disk, capsys):
    write_jpegs(tmp_path / "photos", 16, seed=1)
    args = ["train", "-o", str(small_disk / "run"), *TINY, f"data.train=[{tmp_path / 'photos'}]", "data.eval=[]",
            "model.latent_dim=512", "train.epochs=3", "--no-progress"]  # ~30 MB of weights: the first checkpoint
    one_line_refusal(args, capsys, "could not write checkpoint", "continue with imgvae train --resume")


@pytest.mark.slow
def test_evaluate_and_sample_work_beside_a_training_that_replaces_its_checkpoints(tmp_path):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    out = tmp_path / "run"
    args = [*tiny_train_args(out, tmp_path / "photos", "train.epochs=100000", "train.ckpt_every_steps=1",
                             "train.ckpt_every=0"), "data.eval=[]"]
    proc = subprocess.Popen([sys.executable, "-m", "imgvae", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "checkpoints" / "last").exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        for i in range(5):
            for verb in (["evaluate", str(out), "--data", str(tmp_path / "photos"), "--limit", "8", "-o",
                          str(tmp_path / f"m{i}.json"), "eval.generation_images=8"],
                         ["sample", str(out), "-n", "4", "-o", str(tmp_path / f"s{i}")]):
                done = subprocess.run([sys.executable, "-m", "imgvae", *verb, "--no-progress"], capture_output=True,
                                      text=True)
                assert done.returncode == 0, (verb, done.stderr)
        assert proc.poll() is None  # the checkpoints were being replaced all along
    finally:
        proc.kill()
        proc.wait()


def test_a_picture_of_non_finite_values_is_drawn_black_without_a_warning(tmp_path, recwarn):
    from imgvae.io.pictures import grid, save_grid

    images = torch.rand(4, 3, 8, 8)
    images[1] = float("nan")
    images[2] = float("inf")
    drawn = grid(images, 2)
    assert torch.isfinite(drawn).all() and drawn.min() >= 0 and drawn.max() <= 1
    save_grid(images, 2, tmp_path / "g.png")
    assert not recwarn.list


def test_a_prior_batch_larger_than_the_views_is_refused_before_encoding(run, tmp_path, capsys):
    one_line_refusal(["train-prior", str(run), "-o", str(tmp_path / "p"), "prior.batch_size=4096"], capsys,
                     "training views are fewer than one batch (prior.batch_size=4096)")
    assert not (tmp_path / "p").exists()
