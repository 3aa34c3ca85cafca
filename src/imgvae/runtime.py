"""Where and how a run executes: device, processes (torchrun / DDP) and precision.

A process started without torchrun never calls init_process_group; under torchrun (one
process too) each process joins the group: NCCL on GPUs, gloo on CPUs unless told.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imgvae.errors import ImgvaeError


class RunError(ImgvaeError, RuntimeError):
    """A run that cannot start or go on (occupied output folder, bad resume, no device, ...)."""


class Stopped(RunError):
    """A run stopped by a signal after saving its checkpoint; exit with 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, SIGTERM (how SLURM and Kubernetes preempt), SIGINT (Ctrl-C) and SIGUSR1
    (SLURM's --signal) ask the run to stop at the next step boundary (`received`); a second
    one stops the process at once, with the signal's usual effect."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        if is_main_process():  # under torchrun every process gets the signal; one says so
            print(f"imgvae: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(once more to stop at once)", file=sys.stderr, flush=True)


@contextmanager
def one_line_warnings(category: type[Warning]):
    """While active, warnings of `category` print as one line, "imgvae: MESSAGE" (the command
    line's skipped files); others as Python prints them. Nothing changes on import."""
    previous = warnings.formatwarning

    def one_line(message, cat, filename, lineno, line=None) -> str:
        if issubclass(cat, category):
            return f"imgvae: {message}\n"
        return previous(message, cat, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


def pick_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} was asked for but CUDA is not available")
    return device


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device
    group: bool = False  # in torchrun's process group (DDP), even alone

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a no-op in a single process)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over processes (a no-op in a single process)."""
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: torch.Tensor, op) -> torch.Tensor:
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values, op=op)
        return values.cpu()


def process_rank() -> int:
    """This process's rank in a torchrun job (0 alone): the one place it is read from."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process."""
    return process_rank() == 0


class RunningMean:
    """Image-weighted means of named statistics (scalar tensors or numbers), summed over
    processes when they are read, so that N processes report the global batch's means.
    Sums stay float64 tensors on the statistics' device: adding waits for no GPU."""

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
        self.sums, self.count = dict(sums or {}), count

    def add(self, stats: dict, n: int) -> None:
        """Stats that are means over n images."""
        for k, v in stats.items():
            v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums.get(k, 0.0) + v.double() * n
        self.count += n

    def merge(self, other: RunningMean, keep: torch.Tensor | None = None) -> None:
        """Add other's sums; where the bool tensor `keep` is false, add nothing (a skipped step)."""
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v if keep is None else torch.where(keep, v, 0.0))
        self.count = self.count + (other.count if keep is None else keep.long() * other.count)

    def state(self) -> tuple[dict[str, float], int]:
        """(sums, count) as plain numbers, for a checkpoint."""
        return {k: float(v) for k, v in self.sums.items()}, int(self.count)

    def means(self, processes: Processes | None = None) -> dict[str, float]:
        """{name: mean} over every process's images; {} when there were none."""
        keys = sorted(self.sums)
        totals = torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in
                              [self.sums[k] for k in keys] + [self.count]])
        if processes is not None:
            totals = processes.all_reduce_sum(totals)
        if totals[-1] == 0:
            return {}
        return {k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}


def start_processes(device_name: str, backend: str = "auto") -> Processes:
    """The process group torchrun set up in the environment, or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # not started by torchrun
        return Processes(0, 1, pick_device(device_name))
    rank, local_rank = process_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Processes(rank, world_size, device, group=True)


def stop_processes(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


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
