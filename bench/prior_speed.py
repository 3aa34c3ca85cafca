"""Flow-prior training speed on a CPU by attention kernel (flow_net.CPU_ATTENTION), side by side in
one run: each spatial backbone (diffusers' UNet2DModel, the patch transformer) at its default
size over a sharp-shaped latent (4 x 16 x 16), one optimiser step of the rectified-flow loss at
the precision training takes (train.precision=auto: bf16 where the CPU computes it natively,
else fp32), with PyTorch's default scaled-dot-product kernel (on a CPU: its flash kernel)
against the plain matmul one (SDPBackend.MATH), alternating so that a noisy machine hits both
alike.

    python bench/prior_speed.py                       # batch 32 and 128
    python bench/prior_speed.py --precision bf16 --batch 64
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend

from imgvae.config import FlowConfig
from imgvae.priors import flow, flow_net
from imgvae.train.precision import AUTOCAST_DTYPES, run_precision


def latents_per_second(backbone: str, batch: int, kernel: SDPBackend | None, precision: str, steps: int) -> float:
    """Latents/s of the prior's training step (flow_loss, backward, AdamW) with attention `kernel`."""
    flow_net.CPU_ATTENTION = kernel
    torch.manual_seed(0)
    prior = flow.FlowPrior(FlowConfig(backbone=backbone), (4, 16, 16))
    optimizer = torch.optim.AdamW(prior.parameters(), 1e-3)
    z, noise, t = torch.randn(batch, 4, 16, 16), torch.randn(batch, 4, 16, 16), torch.rand(batch)
    dtype, enabled = AUTOCAST_DTYPES.get(precision, torch.float32), precision in AUTOCAST_DTYPES

    def step():
        with torch.autocast("cpu", dtype, enabled=enabled):
            loss = flow.flow_loss(prior, z, noise, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    precision = run_precision(args.precision, torch.device("cpu"))
    print(f"cpu, {precision}, {torch.get_num_threads()} threads")
    print("| backbone | batch | default kernel, latents/s | math kernel, latents/s | math / default |")
    print("|---|---:|---:|---:|---:|")
    for backbone in ("unet", "transformer"):
        for batch in args.batch:
            runs = {"default": [], "math": []}
            for _ in range(args.repeats):
                runs["default"].append(latents_per_second(backbone, batch, None, precision, args.steps))
                runs["math"].append(latents_per_second(backbone, batch, SDPBackend.MATH, precision, args.steps))
            default, math = (sum(v) / len(v) for v in runs.values())
            print(f"| {backbone} | {batch} | {default:.0f} | {math:.0f} | {math / default:.2f} |", flush=True)


if __name__ == "__main__":
    main()
