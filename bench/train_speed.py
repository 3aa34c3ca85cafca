"""Training speed, side by side in one run, each variant in its own process.

On a CPU (the default), the seed architecture:
  (a) a faithful copy of the seed's loop: eager fp32, PIL + torchvision transforms
      in a DataLoader with --workers processes, per-batch .to(device), RMSprop, the
      seed's loss; (a0) the same loop reading its data in-process (0 workers)
  (b) `imgvae train` with default settings on the same JPEG folder
  (c) `imgvae train` on a prepared uint8 cache, compiled
On a CUDA device, one table of --models (seed, kl-f4, kl-f8, sharp) x fp32 / bf16 x eager /
compiled x loader / device-resident on a prepared cache, after (a): img/s, the share of
wall time spent waiting for batches, peak GPU memory and model FLOP utilisation (the VAE's
forward + backward FLOPs counted by torch.utils.flop_counter, against the GPU's dense bf16
peak), plus compile modes for the first model.

Every variant trains 2 epochs of the corpus; the second is the steady state (no start-up or
compilation, and (b) reads the views it kept in RAM during the first).

    python bench/train_speed.py                                   # 1,280 JPEGs, batch 64, CPU
    python bench/train_speed.py --device cuda --images 20000 --batch 256
    python bench/train_speed.py --device cuda --models seed kl-f8 # a part of the GPU table
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from imgvae.config import DataConfig, LossConfig, TrainConfig, load_config, model_config  # noqa: E402
from imgvae.data.cache import prepare  # noqa: E402
from imgvae.models.losses import vae_loss  # noqa: E402
from imgvae.models.registry import build_model, build_vae  # noqa: E402
from imgvae.train.engine import train  # noqa: E402
from imgvae.train.optim import build_optimizer  # noqa: E402

from data import SeedDataset, write_corpus  # noqa: E402  (bench/data.py)

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; --peak-tflops for others).
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
PRESETS = {"seed": None, "kl-f4": "kl-f4", "kl-f8": "kl-f8", "sharp": "sharp"}  # model -> config preset


def seed_loop(corpus: Path, batch: int, device: torch.device, workers: int) -> dict:
    """The seed's training loop; -> img/s of its two epochs."""
    torch.manual_seed(0)
    model = build_model(model_config(), 64).to(device)
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
    return {"img_per_s": rates[-1], "first_epoch_img_per_s": rates[0], "data_wait": None}


def run_config(spec: dict, source: str, batch: int, device: str):
    """The config of one `imgvae train` variant: spec = {model, precision, compile, data}."""
    overrides = [
        f"data.train=[{source}]", "data.eval=[]", "data.image_size=64", "data.crop=center", "data.crop_size=375",
        "data.exact_decode=false", "data.views_per_image=1",
        "train.epochs=2", f"train.batch_size={batch}", f"train.device={device}", "eval.after_training=false",
        "prior.after_training=false", "train.ckpt_every=0", "train.log_every=1000000",
        f"train.precision={spec.get('precision', 'auto')}",
        f"data.device_cache_gb={'auto' if spec['data'] != 'loader' else 0}",
    ]
    if spec.get("compile"):
        overrides += ["train.compile=true", f"train.compile_mode={spec['compile']}"]
    return load_config(PRESETS[spec["model"]], overrides)


def imgvae_run(spec: dict, source: str, batch: int, device: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="imgvae-speed-"))
    try:
        train(run_config(spec, source, batch, device), out / "run", progress=False)
        history = [json.loads(line) for line in (out / "run" / "history.jsonl").read_text().splitlines()]
        return {"img_per_s": history[-1]["img_per_s"], "first_epoch_img_per_s": history[0]["img_per_s"],
                "data_wait": history[-1]["data_wait"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def flops_per_image(model_name: str) -> float:
    """Forward + backward FLOPs of the VAE for one 64x64 training image (loss terms excluded)."""
    cfg = run_config({"model": model_name, "data": "resident"}, "unused", 2, "cpu")
    model = build_vae(cfg)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        model(x).x_hat.sum().backward()
    return counter.get_total_flops() / 2


def child(args) -> None:
    """One variant in this process; prints a JSON line with its figures."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.spec:
        spec = json.loads(args.spec)
    else:
        spec = list(cpu_variants(args).values())["a a0 b c".split().index(args.variant)]
    if spec["data"] == "seed-loop":
        result = seed_loop(args.corpus, args.batch, device, spec["workers"])
    else:
        source = str(args.corpus if spec["data"] == "jpeg" else args.cache)
        result = imgvae_run(spec, source, args.batch, str(device))
    result["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # without loader workers
    result["device"] = str(device)
    print(json.dumps(result))


def run_variant(args, spec: dict) -> dict | None:
    """One variant in a process of its own -> its figures; None (and the error printed) when it
    fails or runs past --variant-timeout, so that one broken variant leaves the rest of the table."""
    cmd = [sys.executable, __file__, "--spec", json.dumps(spec), "--corpus", str(args.corpus), "--cache",
           str(args.cache), "--batch", str(args.batch), "--device", args.device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
    except subprocess.TimeoutExpired:
        print(f"  variant {spec} ran past {args.variant_timeout} s", flush=True)
        return None
    if proc.returncode != 0:
        print(f"  variant {spec} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_variants(args) -> dict[str, dict]:
    return {
        f"(a) seed loop: eager fp32, PIL loader, {args.workers} workers": {"data": "seed-loop",
                                                                        "workers": args.workers},
        "(a0) seed loop, PIL loader in-process": {"data": "seed-loop", "workers": 0},
        "(b) imgvae train, defaults": {"model": args.models[0], "data": "jpeg"},
        "(c) imgvae train: prepared cache + compile": {"model": args.models[0], "data": "cache",
                                                        "compile": "default"},
    }


def gpu_variants(args) -> dict[str, dict]:
    variants = {f"seed loop: eager fp32, PIL loader, {args.workers} workers": {"data": "seed-loop",
                                                                              "workers": args.workers}}
    for model in args.models:
        for precision, compiled, data in (("fp32", None, "loader"), ("bf16", None, "loader"),
                                          ("bf16", None, "resident"), ("bf16", "default", "resident")):
            variants[f"{model}, {precision}, {compiled or 'eager'}, {data}"] = {
                "model": model, "precision": precision, "compile": compiled, "data": data}
    for mode in ("reduce-overhead", "max-autotune-no-cudagraphs"):
        variants[f"{args.models[0]}, bf16, {mode}, resident"] = {
            "model": args.models[0], "precision": "bf16", "compile": mode, "data": "resident"}
    return variants


def print_table(args, rows: dict[str, dict], specs: dict[str, dict], cuda: bool) -> None:
    device = next(iter(rows.values()))["device"]
    print(f"\n{args.images:,} JPEGs / cached views, batch {args.batch}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else f", {os.cpu_count()} CPUs"))
    base, base_first = (next(iter(rows.values()))[k] for k in ("img_per_s", "first_epoch_img_per_s"))
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items()
                                     if cuda and k in torch.cuda.get_device_name()), None)
    flops = {m: flops_per_image(m) for m in {s["model"] for s in specs.values() if "model" in s}}
    print("| variant | img/s (2nd epoch) | vs first row | 1st epoch img/s | waiting for data | peak RSS MiB "
          "| peak GPU GiB | GFLOP/img | MFU (bf16 peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        model = specs[name].get("model")
        gflop = flops[model] / 1e9 if model else None
        mfu = f"{100 * r['img_per_s'] * flops[model] / (peak * 1e12):.1f} %" if model and peak else "–"
        wait = f"{100 * r['data_wait']:.1f} %" if r["data_wait"] is not None else "–"
        gpu = f"{r['gpu_peak_gib']:.2f}" if r["gpu_peak_gib"] is not None else "–"
        print(f"| {name} | {r['img_per_s']:,.1f} | {r['img_per_s'] / base:.2f}x | {r['first_epoch_img_per_s']:,.1f} "
              f"| {wait} | {r['rss_peak_mib']:,.0f} | {gpu} | {f'{gflop:.2f}' if gflop else '–'} | {mfu} |")
    if peak is None and cuda:
        print("(MFU: unknown bf16 peak for this GPU; give --peak-tflops)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, help="loader processes of the seed loop (default: 2 on a CPU, "
                        "min(8, cores) on CUDA)")
    parser.add_argument("--variant-timeout", type=float, default=600, help="seconds one variant may take")
    parser.add_argument("--models", nargs="+", choices=list(PRESETS), default=None,
                        help="CPU: the model of (b), (c) (default seed); CUDA: the table's models (default all)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["a", "a0", "b", "c"], help=argparse.SUPPRESS)  # bench/ab_speed.sh
    parser.add_argument("--model", choices=list(PRESETS), help=argparse.SUPPRESS)  # bench/ab_speed.sh
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.models = args.models or ([args.model] if args.model else list(PRESETS) if cuda else ["seed"])
    args.workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1) if cuda else 2
    if args.spec or args.variant:
        return child(args)
    tmp = Path(tempfile.mkdtemp(prefix="imgvae-speed-"))
    try:
        args.corpus, args.cache = tmp / "corpus", tmp / "cache"
        write_corpus(args.corpus, args.images)
        prepare([str(args.corpus)], DataConfig(crop="center", views_per_image=1), args.cache, progress=False)
        specs, rows = gpu_variants(args) if cuda else cpu_variants(args), {}
        for name, spec in specs.items():
            result = run_variant(args, spec)
            if result is not None:
                rows[name] = result
                print(f"  measured {name}: {json.dumps(result)}", flush=True)  # kept if the table never comes
        if rows:
            print_table(args, rows, specs, cuda)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
