"""When a run stops before its last epoch: a signal (SIGTERM, SIGINT, SIGUSR1) or
train.time_limit. Under torchrun every process gets the same answer."""

from __future__ import annotations

import signal
import time

import torch

from imgvae.train.processes import Processes, StopSignals


class StopPolicy:
    def __init__(self, time_limit_minutes: float, log_every: int, procs: Processes,
                 signals: StopSignals | None = None):
        self.limit, self.log_every, self.procs, self.signals = time_limit_minutes, log_every, procs, signals
        self.started = time.time()

    def reason(self, step: int, at_epoch_end: bool) -> str | None:
        """"time limit" when train.time_limit has passed, a signal's name (SIGTERM) when one asked
        the run to stop, else None. Under torchrun the processes agree at log points and epoch
        ends only, where the host waits for them anyway: rank clocks differ, and a signal may
        reach one rank first."""
        late = bool(self.limit) and time.time() - self.started > 60 * self.limit
        signum = self.signals.received if self.signals is not None else None
        if self.procs.distributed:
            if step % self.log_every and not at_epoch_end:
                return None
            votes = self.procs.all_reduce_max(torch.tensor([float(late), float(signum or 0)]))
            late, signum = bool(votes[0]), int(votes[1])
        if signum:
            return signal.Signals(signum).name
        return "time limit" if late else None
