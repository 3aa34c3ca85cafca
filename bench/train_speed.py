"""Training speed of the seed architecture, side by side in one run:
  (a) a faithful copy of the seed's loop: eager fp32, PIL + torchvision transforms
      in a DataLoader with --workers processes, per-batch .to(device), RMSprop, the
      seed's loss; (a0) the same loop reading its data in-process (0 workers)
  (b) `imgvae train` with default settings on the same JPEG folder
  (c) `imgvae train` with the fastest settings for the device: a prepared uint8
      cache (read in-process) and torch.compile (+ bf16 autocast on CUDA)
Each variant runs in its own process (peak RSS is that process's, loader workers
excluded) for 2 epochs of the corpus. The second epoch is the steady state: no
start-up or compilation, and (b) reads the views it kept in RAM during the first
(data.memory_cache_gb); the first epoch's rate is shown too.

    python bench/train_speed.py                       # 1,280 JPEGs, batch 64, CPU
    python bench/train_speed.py --device cuda --images 20000 --batch 256
    python bench/train_speed.py --model resnet        # another registered model for (b) and (c)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from imgvae.cache import prepare  # noqa: E402
from imgvae.config import DataConfig, LossConfig, ModelConfig, TrainConfig, load_config  # noqa: E402
from imgvae.losses import vae_loss  # noqa: E402
from imgvae.models import build_model  # noqa: E402
from imgvae.optim import build_optimizer  # noqa: E402
from imgvae.train import train  # noqa: E402

from data import SeedDataset, write_corpus  # noqa: E402  (bench/data.py)


def seed_loop(corpus: Path, batch: int, device: torch.device, workers: int) -> list[float]:
    """The seed's training loop; -> img/s of its two epochs."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 64).to(device)
    opt = build_optimizer(model, TrainConfig())
    loader = DataLoader(SeedDataset(sorted(corpus.glob("*.jpg"))), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True)
    rates = []
    for _ in range(2):
        start, seen = time.perf_counter(), 0
        for x in loader:
            x = x.to(device)
            loss, _ = vae_loss(x, model(x), LossConfig())
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    return rates


def imgvae_run(source: str, batch: int, device: str, model: str, fast: bool) -> list[float]:
    overrides = [
        f"data.train=[{source}]", "data.eval=[]", f"model.name={model}",
        "train.epochs=2", f"train.batch_size={batch}", f"train.device={device}", "eval.after_training=false",
        "train.ckpt_every=0", "train.log_every=1000000",
    ]
    if fast:
        overrides += ["train.compile=true"]
        if device.startswith("cuda"):
            overrides.append("train.precision=bf16")
    out = Path(tempfile.mkdtemp(prefix="imgvae-speed-"))
    try:
        train(load_config(None, overrides), out / "run", progress=False)
        history = [json.loads(line) for line in (out / "run" / "history.jsonl").read_text().splitlines()]
        return [h["img_per_s"] for h in history]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def child(args) -> None:
    """One variant in this process; prints a JSON line with img/s and peak GPU memory."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.variant in ("a", "a0"):
        rates = seed_loop(args.corpus, args.batch, device, args.workers if args.variant == "a" else 0)
    else:
        source = str(args.cache if args.variant == "c" else args.corpus)
        rates = imgvae_run(source, args.batch, str(device), args.model, fast=args.variant == "c")
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the training process, not its loader workers
    print(json.dumps({"img_per_s": rates[-1], "first_epoch_img_per_s": rates[0], "gpu_peak_mib": gpu,
                      "rss_peak_mib": rss,
                      "device": str(device)}))


def run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--corpus", str(args.corpus), "--cache", str(args.cache),
           "--batch", str(args.batch), "--device", args.device, "--workers", str(args.workers), "--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="loader processes of (a); (b) uses the default (auto)")
    parser.add_argument("--model", default="seed", help="model of (b) and (c); (a) is always the seed's")
    parser.add_argument("--variant", choices=["a", "a0", "b", "c"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    tmp = Path(tempfile.mkdtemp(prefix="imgvae-speed-"))
    try:
        args.corpus, args.cache = tmp / "corpus", tmp / "cache"
        write_corpus(args.corpus, args.images)
        prepare([str(args.corpus)], DataConfig(), args.cache, workers=args.workers, progress=False)
        rows = {}
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        for variant, name in (("a", f"(a) seed loop: eager fp32, PIL loader, {args.workers} workers"),
                              ("a0", "(a0) seed loop, PIL loader in-process"), ("b", "(b) imgvae train, defaults"),
                              ("c", "(c) imgvae train, fastest: cache + compile" + (" + bf16" if cuda else ""))):
            rows[name] = run_variant(args, variant)
            print(f"  measured {name}: {rows[name]['img_per_s']:.1f} img/s", flush=True)
        device = next(iter(rows.values()))["device"]
        base, base_first = (rows[next(iter(rows))][k] for k in ("img_per_s", "first_epoch_img_per_s"))
        print(f"\n{args.images} JPEGs, batch {args.batch}, model {args.model} for (b)/(c), "
              f"device {device}"
              + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else f", {os.cpu_count()} CPUs"))
        print("| variant | img/s (2nd epoch) | vs (a) | 1st epoch img/s | vs (a) | peak RSS MiB | peak GPU MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in rows.items():
            gpu = f"{r['gpu_peak_mib']:,.0f}" if r["gpu_peak_mib"] is not None else "–"
            first = r["first_epoch_img_per_s"]
            print(f"| {name} | {r['img_per_s']:,.1f} | {r['img_per_s'] / base:.2f}x | {first:,.1f} "
                  f"| {first / base_first:.2f}x "
                  f"| {r['rss_peak_mib']:,.0f} | {gpu} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
