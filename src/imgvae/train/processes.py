"""The processes a training runs in: one, or a torchrun job's (DDP), the statistics they share,
and the signals that stop them. A process started without torchrun never calls
init_process_group; under torchrun (one process too) each process joins the group: NCCL on
GPUs, gloo on CPUs unless told."""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imgvae.runtime import RunError, is_main_process, pick_device, process_rank


class Stopped(RunError):
    """A run stopped by a signal after saving its checkpoint; exit with 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Interrupted(KeyboardInterrupt):
    """A run stopped at once (a second Ctrl-C); `message` says what was kept and how to go on."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


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
