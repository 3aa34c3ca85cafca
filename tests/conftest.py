"""Small data the tests make: smooth random JPEGs, a fake COCO zip, a tiny config;
the seed's preprocessing written out plainly, to check the package's against."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgvae.commands.cli import main
from imgvae.config import MODEL_CONFIGS, DataConfig, SeedConfig, load_config
from imgvae.data.decode import crop_box, crop_resize, to_rgb


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> fully decoded 8-bit RGB image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def preprocess(img: Image.Image, cfg: DataConfig, rng: random.Random | None = None) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, image_size, image_size): crop, then bilinear
    resize (PIL, antialiased), the seed's order."""
    left, top, side = crop_box(img.width, img.height, cfg, rng)
    return torch.from_numpy(crop_resize(img, left, top, side, cfg.image_size))


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: low-frequency colour blobs (compress and learn well)."""
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def write_jpegs(folder: Path, n: int, seed: int = 0, sizes=((96, 72), (80, 80), (64, 100))) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        path = folder / f"{i:012d}.jpg"
        smooth_image(rng, w, h).save(path, quality=90)
        paths.append(path)
    return paths


def write_coco_zip(path: Path, split: str, n: int, seed: int = 0) -> Path:
    """A zip laid out like COCO's: split/000000000123.jpg, plus a directory entry."""
    src = write_jpegs(path.parent / f"_{split}_src", n, seed)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{split}/", "")
        for p in src:
            zf.write(p, f"{split}/{p.name}")
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    write_jpegs(tmp_path / "photos" / "nested", 24, seed=1)
    return tmp_path / "photos"


@pytest.fixture
def coco_zips(tmp_path) -> dict[str, Path]:
    return {
        "train2017": write_coco_zip(tmp_path / "coco" / "train2017.zip", "train2017", 16, seed=2),
        "test2017": write_coco_zip(tmp_path / "coco" / "test2017.zip", "test2017", 8, seed=3),
        "val2017": write_coco_zip(tmp_path / "coco" / "val2017.zip", "val2017", 6, seed=4),
    }


# Nothing is downloaded at run time: a test that would reach the Hub fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = [
    "data.image_size=32", "data.crop_size=64", "data.num_workers=0",
    "model.latent_dim=16", "train.batch_size=8", "train.log_every=1",
    "eval.grid_size=2", "train.ckpt_every=1", "train.device=cpu", "eval.after_training=false",
    "train.precision=fp32",  # auto is bf16 on CPUs with AMX: tests compare runs on any machine in fp32
]


def tiny(*overrides: str) -> list[str]:
    """TINY and the overrides, without model.latent_dim when the model they name has no such key
    (the spatial-latent models: a key a model does not use is refused)."""
    name = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("model.name=")), "seed")
    keys = {f.name for f in dataclasses.fields(MODEL_CONFIGS.get(name, SeedConfig))}
    return [o for o in [*TINY, *overrides] if "latent_dim" in keys or not o.startswith("model.latent_dim=")]


def tiny_config(train_sources, eval_sources, *extra: str):
    return load_config(None, tiny(f"data.train={list(map(str, train_sources))}",
                                  f"data.eval={list(map(str, eval_sources))}", *extra))


def tiny_train_args(out: Path, photos: Path, *extra: str) -> list[str]:
    """`imgvae train` arguments of a TINY run on the photos, without held-out images."""
    return ["train", "-o", str(out), "--no-progress", *TINY, f"data.train=[{photos}]", "data.eval=[]", *extra]


def train_tiny_run(root: Path, *overrides: str, n_train: int = 16, n_eval: int = 6) -> Path:
    """Write train / eval JPEGs under root and train on them through the CLI -> the run folder."""
    write_jpegs(root / "train", n_train, seed=1)
    write_jpegs(root / "eval", n_eval, seed=2)
    out = root / "run"
    assert main(["train", "-o", str(out), "--no-progress", *tiny(*overrides),
                 f"data.train=[{root / 'train'}]", f"data.eval=[{root / 'eval'}]"]) == 0
    return out
