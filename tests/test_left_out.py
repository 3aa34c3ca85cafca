"""Nothing dropped in silence: the same hostile corpus (an oversized file, an oversized zip
member, an undecodable file, a truncated JPEG) through every data path of training, and through
`prepare`, leaves out the same files for the same reasons, each said once and recorded, and
history.jsonl counts the views each epoch trained on."""

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from imgvae.commands.cli import main
from imgvae.data.datasets import SkippedFile

from conftest import TINY, smooth_image, write_jpegs

EXPECTED = {"large.jpg": "too large", "big_member.jpg": "too large", "junk.jpg": "not an image",
            "truncated.jpg": "truncated"}
GOOD = 10 + 5  # photos + zip members that decode
LIMIT = ["data.max_file_mb=0.02"]  # 20 KB: the noise JPEGs below are larger, the smooth photos far smaller


def noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    assert len(buffer.getvalue()) > 0.02 * 2**20
    return buffer.getvalue()


@pytest.fixture
def corpus(tmp_path):
    photos = tmp_path / "photos"
    write_jpegs(photos, 10, seed=4)
    (photos / "large.jpg").write_bytes(noise_jpeg(0))
    (photos / "junk.jpg").write_text("<!DOCTYPE html><html>404</html>")
    buffer = io.BytesIO()
    smooth_image(np.random.default_rng(1), 96, 72).save(buffer, "JPEG", quality=90)
    (photos / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    members = write_jpegs(tmp_path / "members", 5, seed=5)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        for path in members:
            zf.write(path, f"z/{path.name}")
        zf.writestr("z/big_member.jpg", noise_jpeg(1))
    return [str(photos), str(tmp_path / "photos.zip")]


def assert_left_out(skipped: dict, warned: list[str]) -> None:
    names = {key.rsplit("/", 1)[-1].rsplit(":", 1)[-1]: reason for key, reason in skipped.items()}
    assert set(names) == set(EXPECTED), names
    for name, reason in names.items():
        assert EXPECTED[name] in reason.lower(), (name, reason)
    assert sorted(w.split(" (")[0].rsplit("/", 1)[-1] for w in warned) == sorted(EXPECTED)  # one line each


PATHS = {
    "loader": ["data.memory_cache_gb=0"],
    "views kept in RAM, on the device from epoch 2": [],
    "views kept in RAM, on the device from the start": ["train.batch_size=19"],
    "decoded images kept in RAM": ["data.crop=random", "data.views_per_image=2"],
}


@pytest.mark.parametrize("path", PATHS)
def test_every_training_path_reports_the_same_files_left_out(corpus, tmp_path, path, recwarn):
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--no-progress", *TINY, *LIMIT, "train.epochs=2", "data.eval=[]",
                 f"data.train=[{','.join(corpus)}]", *PATHS[path]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_files"] == len(EXPECTED)
    assert_left_out(summary["skipped"], [str(w.message) for w in recwarn if issubclass(w.category, SkippedFile)])
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    views = 2 if "random" in " ".join(PATHS[path]) else 1
    batch = 19 if "train.batch_size=19" in PATHS[path] else 8
    per_epoch = [r["views"] for r in history]
    assert all(0 < v <= GOOD * views for v in per_epoch) and len(per_epoch) == 2
    if batch == 19:  # one batch an epoch of all 19 files: every readable one trains
        assert per_epoch == [GOOD, GOOD]


def test_a_prepared_cache_and_training_on_it_report_the_same_files(corpus, tmp_path, recwarn):
    cache = tmp_path / "cache"
    assert main(["prepare", "-o", str(cache), "--no-progress", "--device", "cpu", *LIMIT, "data.image_size=32",
                 "data.crop_size=64", f"data.train=[{','.join(corpus)}]"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert_left_out(manifest["skipped"], [str(w.message) for w in recwarn if issubclass(w.category, SkippedFile)])
    recwarn.clear()
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--no-progress", *TINY, "train.epochs=1", "data.eval=[]",
                 f"data.train=[{cache}]"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert_left_out(summary["skipped"], [str(w.message) for w in recwarn if issubclass(w.category, SkippedFile)])
    assert summary["skipped_files"] == len(EXPECTED)
