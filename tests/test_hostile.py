"""Hostile inputs and environments: bad configs refused before any data is read, bounded
resources on hostile files, clean failures when writing fails, graceful preemption,
readers that never see a torn checkpoint, and a corpus of every kind of bad file."""

import errno
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

import imgvae.data.sources as sources_module
import imgvae.io.pictures as pictures_module
from imgvae.commands.cli import main
from imgvae.config import DataConfig, load_config, save_config
from imgvae.data.datasets import SkippedFile, build_dataset
from imgvae.data.decode import load_view
from imgvae.io.checkpoint import load_checkpoint
from imgvae.io.paths import open_model
from imgvae.rundir import read_jsonl, write_text_atomic

from conftest import (
    TINY,
    decode_rgb,
    preprocess,
    smooth_image,
    tiny_train_args,
    train_tiny_run,
    write_coco_zip,
    write_jpegs,
)

MISSING_DATA = "data.train=[/no/such/folder]"  # were data read first, the error would name it


@pytest.mark.parametrize("override, message", [
    ("model.name=foo", "model.name: unknown model 'foo'; available: ['autoencoder-kl', 'kl-f4', 'kl-f8', 'resnet', "
                       "'seed', 'vq-f4', 'vq-f8']"),
    ("data.image_size=60", "data.image_size: model 'seed' needs image_size divisible by 8, got 60"),
    ("data.image_size=0", "data.image_size must be > 0, got 0"),
    ("model.latent_dim=-4", "model.latent_dim must be > 0, got -4"),
    ("eval.fid_weights=/no/such/weights.pth", "eval.fid_weights: no such file '/no/such/weights.pth'"),
])
def test_bad_configs_are_refused_before_any_data_is_read(tmp_path, override, message, capsys):
    assert main(["train", "-o", str(tmp_path / "run"), "--no-progress", MISSING_DATA, override]) == 2
    err = capsys.readouterr().err
    assert err == f"imgvae: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_a_prior_too_large_is_refused_before_training(tmp_path, capsys):
    args = ["model.name=kl-f4", "data.image_size=256", "prior.after_training=true", "prior.components=10"]
    assert main(["train", "-o", str(tmp_path / "run"), MISSING_DATA, *args]) == 2
    assert "prior.components: 10 full-covariance Gaussians over 16384 latent dimensions are too large" in \
        capsys.readouterr().err


@pytest.mark.parametrize("temperature", ["-1", "0"])
def test_sample_refuses_a_temperature_not_above_zero(tmp_path, temperature, capsys):
    run = tmp_path / "run"
    assert main(["train", "-o", str(run), "--no-progress", *TINY, "train.epochs=1", "data.train=[embedded:train]",
                 "data.eval=[]", "data.views_per_image=4", "data.crop=random"]) == 0
    assert main(["sample", str(run), "--temperature", temperature, "-o", str(tmp_path / "s")]) == 2
    assert f"argument --temperature: must be > 0 and <= 1,000, got {temperature}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_default_config_has_a_batch_of_embedded_views():
    cfg = load_config()
    train = build_dataset(cfg.data.train, cfg.data, train=True, seed=0)
    assert cfg.model.name == "seed" and len(train) >= cfg.train.batch_size  # `imgvae train -o OUT` can train


@pytest.mark.slow
def test_the_seed_repos_own_command_trains(tmp_path):
    """`imgvae train -o OUT -l LOGS`, the original's command, with nothing else (minutes on 2 cores)."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    assert main(["train", "-o", str(out), "-l", str(logs), "--no-progress"]) == 0
    assert (out / "metrics.json").is_file() and any(logs.iterdir())


def write_zero_zip_member(path: Path, name: str, size: int, photos: list[Path]) -> None:
    """A zip holding real photos and a member of `size` zero bytes (a zip bomb named as an image)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for p in photos:
            zf.write(p, p.name)
        with zf.open(name, "w", force_zip64=True) as member:
            for _ in range(size // 2**24):
                member.write(bytes(2**24))


def peak_rss_mb_of_training(out: Path, sources: list[Path]) -> float:
    """Train a tiny run in a fresh process -> its peak RSS in MiB."""
    script = f"""
import resource
from imgvae.commands.cli import main
args = ["train", "-o", {str(out)!r}, "--no-progress", *{TINY!r}, "train.epochs=1", "data.eval=[]",
        "data.train=[{",".join(map(str, sources))}]"]
assert main(args) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


def test_huge_files_and_zip_bombs_are_skipped_unread(tmp_path):
    photos = write_jpegs(tmp_path / "clean" / "photos", 16)
    write_coco_zip(tmp_path / "clean" / "more.zip", "more", 8)
    hostile = tmp_path / "hostile"
    shutil.copytree(tmp_path / "clean", hostile)
    with open(hostile / "photos" / "huge.jpg", "wb") as f:
        f.truncate(2**30)  # 1 GiB, sparse: costs no disk
    write_zero_zip_member(hostile / "bomb.zip", "bomb.jpg", 2**30, photos[:8])
    clean = peak_rss_mb_of_training(tmp_path / "run_clean", [tmp_path / "clean" / "photos",
                                                             tmp_path / "clean" / "more.zip"])
    rss = peak_rss_mb_of_training(tmp_path / "run_hostile", [hostile / "photos", hostile / "more.zip",
                                                             hostile / "bomb.zip"])
    assert rss - clean < 100, (clean, rss)
    skipped = json.loads((tmp_path / "run_hostile" / "summary.json").read_text())["skipped"]
    too_large = "too large: 1,024.0 MB (data.max_file_mb is 256)"
    assert skipped == {str(hostile / "photos" / "huge.jpg"): too_large, f"{hostile / 'bomb.zip'}:bomb.jpg": too_large}


def test_a_truncated_zip_is_reported_as_corrupt(tmp_path, capsys):
    write_coco_zip(tmp_path / "train.zip", "train", 4)
    data = (tmp_path / "train.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])  # the central directory is gone
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])  # the same, without the extension
    for name in ("cut.zip", "cut.bin"):
        assert main(["train", "-o", str(tmp_path / "run"), f"data.train=[{tmp_path / name}]"]) == 2
        assert "a corrupt or truncated zip file" in capsys.readouterr().err


def no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_checkpoint_that_cannot_be_written_stops_cleanly_and_resume_continues(tmp_path, monkeypatch, capsys):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    args = ["train", "-o", str(tmp_path / "run"), "--no-progress", *TINY, f"data.train=[{tmp_path / 'photos'}]",
            "data.eval=[]", "train.epochs=2", "train.ckpt_every_steps=1"]
    real_save, calls = torch.save, []

    def disk_full_at_step_3(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_at_step_3)
    assert main(args) == 2
    err = capsys.readouterr().err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert err.count("\n") == 1 and "could not write checkpoint step_00000003" in err
    assert f"the last good checkpoint is {checkpoints / 'step_00000002'}" in err and "--resume" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step_00000002"]  # no temp folder left
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main([*args[:2], str(tmp_path / "straight"), *args[3:]]) == 0
    same = load_file(str(checkpoints / "last" / "model.safetensors"))
    for k, v in load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors")).items():
        assert torch.equal(v, same[k]), k


def test_a_grid_that_cannot_be_written_stops_with_one_line(tmp_path, monkeypatch, capsys):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    real_save = pictures_module.save_image

    def disk_full_in_epoch_2(image, path, *a, **k):
        if "epoch_002" in str(path):
            raise no_space(path)
        return real_save(image, path, *a, **k)

    monkeypatch.setattr(pictures_module, "save_image", disk_full_in_epoch_2)
    assert main(["train", "-o", str(tmp_path / "run"), "--no-progress", *TINY, f"data.train=[{tmp_path / 'photos'}]",
                 "data.eval=[]", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    grid = tmp_path / "run" / "grids" / "epoch_002_ground_truth.png"
    assert err == (f"imgvae: error: stopped, No space left on device: {grid}; the last good checkpoint is "
                   f"{tmp_path / 'run' / 'checkpoints' / 'epoch_001'}: make room or fix the folder, then continue "
                   f"with imgvae train --resume {tmp_path / 'run'}\n")


def test_results_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, '{"psnr": 13.7}')

    def full(self, text):
        Path.write_bytes(self, text[:3].encode())
        raise no_space(self)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        write_text_atomic(path, '{"psnr": 20.1}')
    monkeypatch.undo()
    assert path.read_text() == '{"psnr": 13.7}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    (tmp_path / "steps.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')  # cut short while appending
    assert read_jsonl(tmp_path / "steps.jsonl") == [{"step": 1}, {"step": 2}]


def _start_training(out: Path, photos: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "imgvae", *tiny_train_args(out, photos, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_steps(out: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.time() + 120
    while len(read_jsonl(out / "steps.jsonl")) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


SIGNAL_RUN = ["train.epochs=4", "train.ckpt_every=0"]  # 12 steps, no step checkpoints


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The photos the signal tests train on and the weights of their run without a stop."""
    root = tmp_path_factory.mktemp("signals")
    write_jpegs(root / "photos", 24, seed=1)
    assert main(tiny_train_args(root / "straight", root / "photos", *SIGNAL_RUN)) == 0
    return root / "photos", load_file(str(root / "straight" / "checkpoints" / "last" / "model.safetensors"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_stops_at_the_next_step_with_a_checkpoint_and_resume_is_exact(tmp_path, signum, straight_run):
    photos, fresh = straight_run
    out = tmp_path / "run"
    proc = _start_training(out, photos, *SIGNAL_RUN)
    _wait_for_steps(out, proc, random.Random(signum).randint(2, 9))
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    stopped_at = load_checkpoint(out)[1]["step"]
    assert proc.returncode == 128 + signum, err
    assert err.splitlines()[-1] == (f"imgvae: stopped by {signal.Signals(signum).name} at step {stopped_at}, "
                                    f"checkpoint {out / 'checkpoints' / f'step_{stopped_at:08d}'}; "
                                    f"continue with imgvae train --resume {out}")
    assert stopped_at < 12 and not (out / "metrics.json").exists()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    resumed = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert resumed.keys() == fresh.keys() and all(torch.equal(resumed[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("signum, returncode", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 3)])
def test_a_second_signal_stops_at_once(signum, returncode):
    script = """
import sys, time
from imgvae.train.processes import StopSignals
try:
    with StopSignals() as signals:
        print("ready", flush=True)
        while True:
            time.sleep(0.01)
except KeyboardInterrupt:
    sys.exit(3)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signum)
    assert "stopping after this step with a checkpoint (once more to stop at once)" in proc.stderr.readline()
    proc.send_signal(signum)
    proc.communicate(timeout=30)
    assert proc.returncode == returncode


def test_torchrun_processes_stop_together_on_sigterm_and_resume(tmp_path):
    write_jpegs(tmp_path / "photos", 24, seed=1)
    resnet = ["model.name=resnet", "model.base_channels=8", "model.levels=2", "train.optimizer=adam"]

    def torchrun(*args):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "imgvae",
                "train", *args, "--no-progress"]

    config = [*TINY, *resnet, f"data.train=[{tmp_path / 'photos'}]", "data.eval=[]", "train.batch_size=4",
              "train.epochs=3"]
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun("-o", str(out), *config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_steps(out, proc, 4)
    proc.send_signal(signal.SIGTERM)  # as SLURM and Kubernetes do: the launcher relays it to its workers
    _, err = proc.communicate(timeout=120)
    state = load_checkpoint(out)[1]
    assert err.count("imgvae: stopped by SIGTERM at step") == 1, err[-3000:]
    assert state["step"] == read_jsonl(out / "steps.jsonl")[-1]["step"] < 9  # both stopped after the same step
    subprocess.run(torchrun("--resume", str(out)), check=True, capture_output=True, timeout=300)
    subprocess.run(torchrun("-o", str(tmp_path / "straight"), *config), check=True, capture_output=True, timeout=300)
    resumed, fresh = (load_file(str(p / "checkpoints" / "last" / "model.safetensors"))
                      for p in (out, tmp_path / "straight"))
    for k in fresh:
        torch.testing.assert_close(resumed[k], fresh[k], rtol=1e-5, atol=1e-6, msg=k)


WRITER = """
import sys, torch
from pathlib import Path
from imgvae.io.checkpoint import prune_checkpoints, save_checkpoint
from imgvae.config import load_config, to_dict
from imgvae.models.registry import build_vae
cfg = load_config(None, {overrides!r})
model = build_vae(cfg)
root = Path(sys.argv[1])
for step in range(1, 10**9):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    state = {{"step": step, "config": to_dict(cfg)}}
    save_checkpoint(root, f"step_{{step:08d}}", model, state, {{"ema": model}})
    prune_checkpoints(root, set())
    if step == 1:
        print("first", flush=True)
"""


def test_readers_never_see_a_torn_checkpoint_while_a_run_writes(tmp_path):
    """One process writes and prunes checkpoints as fast as it can (every file of checkpoint
    N holds N); the readers here must always get every file from one checkpoint."""
    overrides = ["model.name=resnet", "model.base_channels=4", "model.levels=2", "model.latent_dim=4",
                 "data.image_size=16"]
    (tmp_path / "run").mkdir()
    save_config(load_config(None, overrides), tmp_path / "run" / "config.yaml")
    script = WRITER.format(overrides=overrides)
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run" / "checkpoints")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "first\n"
        seen = set()
        deadline = time.time() + 5
        while time.time() < deadline:
            weights, state = load_checkpoint(tmp_path / "run")
            assert all(torch.all(w == state["step"]) for w in weights.values())
            model, _, folder = open_model(tmp_path / "run")
            step = int(folder.name.split("_")[1])
            assert all(torch.all(p == step) for p in model.parameters())  # EMA file and folder agree
            seen.add(step)
    finally:
        writer.kill()
        writer.wait()
    assert len(seen) > 10  # the checkpoints did change under the readers


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 120x80 photo whose EXIF says: turn me (6: 90 degrees clockwise) to see me upright."""
    img = smooth_image(np.random.default_rng(3), 120, 80)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("exact", [True, False])
def test_exif_orientation_is_honoured_only_when_asked(exact):
    data = exif_rotated_jpeg()
    base = {"image_size": 32, "crop_size": 64, "exact_decode": exact}
    as_stored = load_view(data, DataConfig(**base))
    upright = load_view(data, DataConfig(**base, exif_transpose=True))
    if exact:  # bit for bit the seed's pipeline on the turned photo
        photo = decode_rgb(data)
        assert torch.equal(torch.from_numpy(as_stored), preprocess(photo, DataConfig(**base)))
        assert torch.equal(torch.from_numpy(upright), preprocess(ImageOps.exif_transpose(photo), DataConfig(**base)))
    else:  # the reduced-scale decode crops the same square of the turned photo
        exact_upright = load_view(data, DataConfig(**{**base, "exact_decode": True}, exif_transpose=True)).astype(float)
        assert np.abs(upright.astype(float) - exact_upright).mean() < 3
    assert not np.array_equal(as_stored, upright)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels: a decompression bomb as far as its header goes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write_hostile_corpus(root: Path) -> dict[str, str]:
    """Every kind of file a real photo folder or zip may hold -> {name: the reason it is skipped}
    for the bad ones; the others must train."""
    photos = root / "photos"
    write_jpegs(photos, 18)  # with the 22 files below, 40: every file is read in one epoch of batch 8
    rgb = smooth_image(np.random.default_rng(0), 96, 72)
    good = {
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "grey16.png": encoded(Image.fromarray(np.full((40, 50), 40000, np.uint16)), "PNG"),
        "palette.png": encoded(rgb.convert("P"), "PNG"),
        "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "la.png": encoded(rgb.convert("LA"), "PNG"),
        "one_pixel.png": encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "wide_20x10.png": encoded(rgb.resize((20, 10)), "PNG"),
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "café au lait ü.jpg": encoded(rgb, "JPEG"),
        "with space.jpg": encoded(rgb, "JPEG"),
    }
    for name, data in good.items():
        (photos / name).write_bytes(data)
    jpeg = encoded(rgb, "JPEG")
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (photos / "page.png").write_text("<!DOCTYPE html><html><body>404 not found</body></html>")
    (photos / "bomb.png").write_bytes(png_header_only(30000, 30000))  # 900 MP: over PIL's own limit
    (photos / "big.png").write_bytes(png_header_only(12000, 12000))  # 144 MP: over data.max_megapixels
    (photos / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (photos / "loop_a.jpg").symlink_to(photos / "loop_b.jpg")
    (photos / "loop_b.jpg").symlink_to(photos / "loop_a.jpg")
    (photos / "subfolder_loop").symlink_to(photos)  # a link back up: each folder is read once
    (photos / "secret.jpg").write_bytes(jpeg)  # unreadable: see test
    with zipfile.ZipFile(root / "archive.zip", "w") as zf:
        zf.writestr("../../escape.jpg", jpeg)  # never extracted: only read
        zf.writestr("/absolute.jpg", jpeg)
        zf.writestr("inner.zip", b"PK\x05\x06" + bytes(18))  # a nested zip: not an image name, not listed
        zf.writestr("zip_in_disguise.jpg", b"PK\x05\x06" + bytes(18))
    return {
        "zero.jpg": "an empty file",
        "truncated.jpg": "truncated",
        "page.png": "not an image (PIL cannot identify its format)",
        "bomb.png": "DecompressionBombError: Image size (900000000 pixels) exceeds limit",
        "big.png": "too many pixels: 12000x12000 = 144.0 MP (data.max_megapixels is 128)",
        "dangling.jpg": "No such file or directory",
        "loop_a.jpg": "Too many levels of symbolic links",
        "loop_b.jpg": "Too many levels of symbolic links",
        "secret.jpg": "Permission denied",
        "zip_in_disguise.jpg": "not an image (PIL cannot identify its format)",
    }


def test_a_hostile_corpus_trains_with_every_bad_file_skipped_for_a_reason(tmp_path, monkeypatch, recwarn):
    bad = write_hostile_corpus(tmp_path / "corpus")
    real_read = sources_module.read_file

    def unreadable_secret(path, limit):
        if Path(path).name == "secret.jpg":  # chmod 000 does not stop root: inject what it does to others
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_read(path, limit)

    monkeypatch.setattr(sources_module, "read_file", unreadable_secret)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    assert main(["train", "-o", str(out), "--no-progress", *TINY, "train.epochs=1", "data.eval=[]",
                 f"data.train=[{tmp_path / 'corpus' / 'photos'},{tmp_path / 'corpus' / 'archive.zip'}]"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    skipped = {key.rsplit("/", 1)[-1].rsplit(":", 1)[-1]: reason for key, reason in summary["skipped"].items()}
    assert set(skipped) == set(bad), skipped
    for name, reason in skipped.items():
        assert bad[name].lower() in reason.lower() and "\n" not in reason and " at 0x" not in reason, (name, reason)
    assert summary["images_seen_this_run"] == 18 + 10 + 2  # the photos, the odd but good images, the zip's two
    warned = [str(w.message) for w in recwarn if issubclass(w.category, SkippedFile)]
    assert len(warned) == len(bad) and all("\n" not in w and " at 0x" not in w for w in warned)
    written_elsewhere = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out} - before
    assert not written_elsewhere and not (tmp_path.parent / "escape.jpg").exists()


def test_skipped_files_are_one_line_each_on_the_command_line(tmp_path):
    write_jpegs(tmp_path / "photos", 16)
    (tmp_path / "photos" / "junk.jpg").write_text("<html>")
    result = subprocess.run([sys.executable, "-m", "imgvae", "train", "-o", str(tmp_path / "run"), "--no-progress",
                             *TINY, "train.epochs=1", f"data.train=[{tmp_path / 'photos'}]", "data.eval=[]"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stderr == (f"imgvae: skipping unreadable image {tmp_path / 'photos' / 'junk.jpg'} "
                             "(not an image (PIL cannot identify its format))\n")


@pytest.fixture(scope="module")
def random_crop_run(tmp_path_factory):
    """A run trained and held out on random crops (3 per held-out photo), as the demo is."""
    return train_tiny_run(tmp_path_factory.mktemp("crops"), "train.epochs=1", "data.crop=random",
                          "data.views_per_image=2", "data.eval_views_per_image=3")


def test_evaluate_takes_the_users_images_as_they_are(random_crop_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    write_jpegs(mine, 5, seed=8)
    quick = "eval.generation_images=0"  # the views are the point here, not the samples' scores
    assert main(["evaluate", str(random_crop_run), "--limit", "100", "-o", str(tmp_path / "run.json"),
                 "--no-progress", quick]) == 0
    as_run = json.loads((tmp_path / "run.json").read_text())
    assert as_run["images"] == 6 * 3 and as_run["preprocessing"]["crop"] == "random"  # the run's held-out views
    assert main(["evaluate", str(random_crop_run), "--data", str(mine), quick, "-o", str(tmp_path / "m.json"),
                 "--no-progress"]) == 0
    given = json.loads((tmp_path / "m.json").read_text())
    assert given["images"] == 5 and given["preprocessing"]["crop"] == "center"
    assert given["preprocessing"]["eval_views_per_image"] == 1
    assert "one centre crop of min(64, shorter side) per image, resized to 32 px" in capsys.readouterr().out
    # Asked otherwise: KEY=VALUE, also after --data's list.
    assert main(["evaluate", str(random_crop_run), "--data", str(mine), "data.crop=random",
                 "data.eval_views_per_image=2", quick, "-o", str(tmp_path / "m2.json"), "--no-progress"]) == 0
    asked = json.loads((tmp_path / "m2.json").read_text())
    assert asked["images"] == 10 and asked["preprocessing"]["crop"] == "random"
    # ... and after the options, where argparse alone refuses them.
    assert main(["evaluate", str(random_crop_run), "--data", str(mine), "-o", str(tmp_path / "m3.json"),
                 "--no-progress", "data.crop=random", "data.eval_views_per_image=2", quick]) == 0
    assert json.loads((tmp_path / "m3.json").read_text())["images"] == 10


def test_fit_prior_and_reconstruct_take_data_overrides(random_crop_run, tmp_path, capsys):
    mine = write_jpegs(tmp_path / "mine", 4, seed=8, sizes=((200, 150),))
    assert main(["fit-prior", str(random_crop_run), "--data", str(tmp_path / "mine"), "--no-progress"]) == 0
    assert "fitted on 4 training images" in capsys.readouterr().out  # one centre view each
    for name, extra in (("plain", []), ("wide", ["data.crop_size=150"])):
        assert main(["reconstruct", str(random_crop_run), str(mine[0]), *extra, "-o", str(tmp_path / name)]) == 0
    pngs = [(tmp_path / name / f"{mine[0].stem}_reconstruction.png").read_bytes() for name in ("plain", "wide")]
    assert pngs[0] != pngs[1]


@pytest.mark.parametrize("override, message", [
    ("model.latent_dim=8", "model.* cannot change for a trained model; only data, eval, prior keys"),
    ("data.image_size=48", "data.image_size: this model takes 32 px images"),
    ("eval.iw_samples=0", "eval.iw_samples must be >= 1, got 0"),
])
def test_overrides_a_trained_model_cannot_take_are_refused(random_crop_run, tmp_path, override, message, capsys):
    assert main(["evaluate", str(random_crop_run), override, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"imgvae: error: {message}\n"
