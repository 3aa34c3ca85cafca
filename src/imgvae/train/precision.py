"""How a training computes: its precision (bf16 / fp16 autocast, the fp16 loss scaler, TF32 on
CUDA) and, on a CPU, glibc's handling of freed memory."""

from __future__ import annotations

import ctypes
from contextlib import nullcontext

import torch

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the OS.

    By default, blocks over 32 MiB (the seed model's 64 MiB linear layer and its
    gradients) come from fresh mmap calls, and every step page-faults them in again
    (bench/RESULTS.md measures the cost). Process-wide; the cost is that the process keeps
    its peak memory. Returns False where the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_precision(precision: str, device: torch.device) -> str:
    """train.precision on this device: "auto" is bf16 where the device computes in bf16 natively
    (a CUDA GPU that has it, a CPU with AMX or AVX512-BF16), else fp32 (emulated bf16 is slow)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
    return "bf16" if native else "fp32"


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16, by torch.cpu's probes (private: absent ones count as no)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def allow_tf32(on: bool) -> None:
    """CUDA fp32 matmuls and convolutions on TF32 tensor cores, or not. Through the legacy
    switches: torch.compile reads those, and mixing them with the newer fp32_precision ones
    is an error."""
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for the forward pass ("fp32": none)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16, whose small gradients would underflow; disabled otherwise.
    Starts at 2^8, not 2^16: our losses are sums over pixels (1e3 to 1e5), whose
    gradients at 2^16 overflow fp16 for the first ~10 steps."""
    return torch.amp.GradScaler(device.type, init_scale=2.0**8, enabled=precision == "fp16")
