"""`imgvae prepare` on the CPU (PIL, every core) against decoding on a device (torchvision's
decode_jpeg in batches: nvJPEG on CUDA), on the same generated COCO-like JPEGs, side by side;
and how far the device's views are from PIL's full decode (data.exact_decode=true).

    python bench/prepare_speed.py --device cuda --images 20000
    python bench/prepare_speed.py --device cpu --images 2000     # the batched path on the CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgvae.config import DataConfig
from imgvae.data.cache import prepare

from data import write_corpus  # noqa: E402  (bench/data.py)


def timed_prepare(corpus: Path, cfg: DataConfig, out: Path, **kwargs) -> float:
    start = time.perf_counter()
    prepare([str(corpus)], cfg, out, progress=False, **kwargs)  # its views are back on the host: no sync needed
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk", type=int, default=256, help="images per device batch")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes of the CPU path")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imgvae-prepare-"))
    try:
        write_corpus(tmp / "corpus", args.images)
        cfg = DataConfig(crop="center", views_per_image=1)
        if args.device.startswith("cuda"):  # the first nvJPEG call sets up its handles: not part of the rate
            (tmp / "few").mkdir()
            for path in sorted((tmp / "corpus").glob("*.jpg"))[:32]:
                (tmp / "few" / path.name).symlink_to(path)
            prepare([str(tmp / "few")], cfg, tmp / "warm", chunk=16, progress=False, device=args.device)
        rows = {
            f"CPU, PIL, {args.workers} processes (reduced-scale JPEG decode)":
                timed_prepare(tmp / "corpus", cfg, tmp / "cpu", workers=args.workers),
            f"CPU, PIL, {args.workers} processes, data.exact_decode=true":
                timed_prepare(tmp / "corpus", DataConfig(crop="center", views_per_image=1, exact_decode=True),
                              tmp / "exact", workers=args.workers),
            f"{args.device}, decode_jpeg in batches of {args.chunk}":
                timed_prepare(tmp / "corpus", cfg, tmp / "device", chunk=args.chunk, device=args.device),
        }
        exact = np.load(tmp / "exact" / "images.npy").astype(np.float64)
        caches = dict(zip(rows, ("cpu", "exact", "device")))
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
        print(f"\n{args.images:,} JPEGs (mostly 640x480, quality 90) -> 64x64 centre views; {name}")
        print("| path | seconds | img/s | vs CPU | PSNR against the exact decode, dB |")
        print("|---|---:|---:|---:|---:|")
        base = rows[next(iter(rows))]
        for label, seconds in rows.items():
            views = np.load(tmp / caches[label] / "images.npy").astype(np.float64)
            mse = np.mean((views - exact) ** 2)
            psnr = "exact" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f}"
            print(f"| {label} | {seconds:.1f} | {args.images / seconds:,.0f} | {base / seconds:.2f}x | {psnr} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
