"""Data-loading benchmark: the seed's pipeline vs ours on the fly vs a prepared cache.

Writes a COCO-like corpus of JPEGs (photo-like texture, quality 90, mostly
640x480 with other sizes and some greyscale) once, then measures side by side:
  (a) seed:   PIL full decode + torchvision CenterCrop/Resize/Flip/ToTensor/Normalize
  (b) ours:   reduced-scale JPEG decode, uint8 workers, flip+normalise on the batch
  (b') ours with data.exact_decode=true (bit-identical to (a) without the flip)
  (c) cache:  imgvae prepare once, then read the memory-mapped uint8 file
as loader throughput (a full pass, images/s) and as the share of a seed-model
training step (fp32, batch 64) spent waiting for the next batch.

    python bench/data.py                  # 2,000 images, 2 workers, 6 timed steps each
    python bench/data.py --images 500 --steps 3
    python bench/data.py --images 10000 --corpus /tmp/c10k --corpus-only   # then time imgvae prepare on it
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from imgvae.config import DataConfig, LossConfig, TrainConfig, model_config
from imgvae.data.cache import prepare
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import load_view, to_model_input
from imgvae.data.loading import make_loader
from imgvae.models.losses import vae_loss
from imgvae.models.registry import build_model
from imgvae.train.optim import build_optimizer

SIZES = [(640, 480)] * 6 + [(480, 640), (640, 427), (500, 375), (612, 612)]


def write_corpus(folder: Path, n: int) -> list[Path]:
    """n JPEGs in folder, written by all CPU cores; image i is the same whatever n."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:012d}.jpg" for i in range(n)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.starmap(_write_photo, enumerate(paths), chunksize=64)
    return paths


def _write_photo(i: int, path: Path) -> None:
    rng = np.random.default_rng((0, i))
    w, h = SIZES[i % len(SIZES)]
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    coarse = coarse.resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(coarse, np.int16) + rng.integers(-20, 21, (h, w, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if i % 25 == 0:
        img = img.convert("L")
    img.save(path, quality=90)


class SeedDataset(Dataset):
    """The seed's loader: full decode with PIL, torchvision transforms on PIL images."""

    def __init__(self, paths):
        self.paths = paths
        self.transform = T.Compose([T.CenterCrop(375), T.Resize(64), T.RandomHorizontalFlip(), T.ToTensor()])
        self.normalize = T.Normalize([0.5] * 3, [0.5] * 3)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = self.transform(Image.open(self.paths[i]))
        return self.normalize(x.repeat(3, 1, 1) if x.shape[0] == 1 else x)  # grey -> RGB by replication


def seed_batches(paths, workers, batch):
    loader = DataLoader(SeedDataset(paths), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    for x in loader:
        yield x


def our_batches(dataset, workers, batch, device):
    loader, sampler = make_loader(dataset, batch, True, seed=0, num_workers=workers)
    for epoch in range(1000):
        sampler.set_epoch(epoch)
        for step, (images, _, _) in enumerate(loader):
            flips = torch.rand(len(images), generator=torch.Generator().manual_seed(step)) < 0.5
            yield to_model_input(images, device, flips)


def loader_rate(batches, n_images) -> float:
    """Images/s for a full pass (worker start-up included, as in an epoch)."""
    start, seen = time.perf_counter(), 0
    for x in batches:
        seen += len(x)
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - start)


def wait_share(batches, steps: int) -> tuple[float, float]:
    """(share of step time spent waiting for data, training img/s) over `steps`
    seed-model steps after one warm-up step."""
    torch.manual_seed(0)
    model = build_model(model_config(), 64)
    opt = build_optimizer(model, TrainConfig())
    waited = total = 0.0
    seen = 0
    it = iter(batches)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        x = next(it)
        t1 = time.perf_counter()
        loss, _ = vae_loss(x, model(x), LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step:  # the first step pays for worker start-up
            waited, total, seen = waited + t1 - t0, total + t2 - t0, seen + len(x)
    return waited / total, seen / total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per loader")
    parser.add_argument("--corpus", type=Path, help="reuse/keep the corpus here instead of a temp dir")
    parser.add_argument("--corpus-only", action="store_true", help="write the corpus (with --corpus) and stop")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="imgvae-bench-"))
    corpus = args.corpus or tmp / "corpus"
    try:
        t = time.perf_counter()
        paths = sorted(corpus.glob("*.jpg")) if corpus.exists() else []
        if len(paths) < args.images:
            paths = write_corpus(corpus, args.images)
        paths = paths[: args.images]
        print(f"corpus: {len(paths)} JPEGs in {corpus} ({time.perf_counter() - t:.0f} s)")
        if args.corpus_only:
            return

        # Quality of the fast path against the exact one, on the same images.
        fast_cfg, exact_cfg = DataConfig(), DataConfig(exact_decode=True)
        psnr = []
        for p in paths[:300]:
            data = p.read_bytes()
            a = load_view(data, fast_cfg).astype(np.float64)
            b = load_view(data, exact_cfg).astype(np.float64)  # full decode: the seed's pipeline, bit for bit
            psnr.append(10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-10)))
        print(f"fast vs exact decode: PSNR mean {np.mean(psnr):.1f} dB, min {np.min(psnr):.1f} dB "
              f"over {len(psnr)} images")

        t = time.perf_counter()
        prepare([str(corpus)], fast_cfg, tmp / "cache", workers=args.workers, progress=False)
        prepare_rate = len(paths) / (time.perf_counter() - t)
        print(f"prepare: {prepare_rate:.0f} img/s with {args.workers} workers")

        sources = {
            "(a) seed pipeline": lambda: seed_batches(paths, args.workers, args.batch),
            "(b) ours, on the fly":
                lambda: our_batches(build_dataset([str(corpus)], fast_cfg, True, 0), args.workers, args.batch, cpu),
            "(b') ours, exact decode":
                lambda: our_batches(build_dataset([str(corpus)], exact_cfg, True, 0), args.workers, args.batch, cpu),
            "(c) prepared cache":
                lambda: our_batches(build_dataset([str(tmp / "cache")], fast_cfg, True, 0), 0, args.batch, cpu),
        }
        rows = []
        for name, make in sources.items():
            n = len(paths) - len(paths) % args.batch
            rate = loader_rate(make(), n)
            share, train_rate = wait_share(make(), args.steps)
            rows.append((name, rate, share, train_rate))
            print(f"  measured {name}: {rate:.0f} img/s", flush=True)

        base = rows[0][1]
        print(f"\n{len(paths)} JPEGs, batch {args.batch}, {args.workers} loader workers "
              f"(cache: in-process), {torch.get_num_threads()} torch threads")
        print("| loader | img/s | vs (a) | data wait, share of step | training img/s |")
        print("|---|---:|---:|---:|---:|")
        for name, rate, share, train_rate in rows:
            print(f"| {name} | {rate:,.0f} | {rate / base:.1f}x | {100 * share:.1f} % | {train_rate:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
