"""A COCO-sized epoch end to end: a synthetic prepared cache of --images 64x64 views (COCO
train2017 + test2017 is ~164k images) written in imgvae's cache format, then `imgvae train` for
two epochs on it, each timed (the first includes start-up and compilation), with the run's own
settings (KEY=VALUE after the options).

    python bench/coco_epoch.py --device cuda train.precision=bf16 train.compile=true train.batch_size=256
    python bench/coco_epoch.py --images 4096 --device cpu          # a quick check of the script on a CPU

Prints: each epoch's seconds, img/s, the share of time spent waiting for data, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgvae.config import DataConfig, load_config
from imgvae.data.sources import CACHE_FORMAT, CACHE_VERSION, IMAGES, KEYS, MANIFEST, VALID, preprocessing_signature
from imgvae.train.engine import train


def write_synthetic_cache(out: Path, n: int, size: int = 64, chunk: int = 8192) -> None:
    """n smooth random uint8 views (photo-like: low frequencies), as `imgvae prepare` lays them out."""
    out.mkdir(parents=True)
    images = np.lib.format.open_memmap(out / IMAGES, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    rng = torch.Generator().manual_seed(0)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        coarse = torch.randint(0, 256, (m, 3, 4, 4), generator=rng, dtype=torch.uint8).float()
        smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic")
        images[start:start + m] = smooth.clamp(0, 255).byte().numpy()
    images.flush()
    np.save(out / VALID, np.arange(n))
    (out / KEYS).write_text("".join(f"synthetic/{i:012d}.jpg\n" for i in range(n)))
    cfg = DataConfig(image_size=size, crop="center")
    (out / MANIFEST).write_text(json.dumps({
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "preprocessing": preprocessing_signature(cfg),
        "sources": ["synthetic"], "rows": n, "count": n, "skipped": {}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=164_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings of the run (default: seed)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imgvae-coco-epoch-"))
    try:
        start = time.perf_counter()
        write_synthetic_cache(tmp / "cache", args.images)
        print(f"synthetic cache of {args.images:,} views written in {time.perf_counter() - start:.1f} s", flush=True)
        cfg = load_config(None, [f"data.train=[{tmp / 'cache'}]", "data.eval=[]", "data.crop=center",
                                 "data.views_per_image=1", "train.epochs=2", f"train.device={args.device}",
                                 "eval.after_training=false", "train.ckpt_every=0", "train.log_every=1000000",
                                 *args.overrides])
        start = time.perf_counter()
        summary = train(cfg, tmp / "run", progress=True)
        total = time.perf_counter() - start
        first, second = (json.loads(line) for line in (tmp / "run" / "history.jsonl").read_text().splitlines())
        cuda = torch.cuda.is_available()
        gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        print(f"\n{args.images:,} images, {' '.join(args.overrides) or 'seed defaults'}, {summary['device']}: "
              f"epoch 1 {first['seconds']:.1f} s (with start-up), epoch 2 {second['seconds']:.1f} s "
              f"({second['img_per_s']:,.0f} img/s, {100 * second['data_wait']:.1f} % waiting for data), "
              f"whole run {total:.1f} s{gpu}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
