"""Divergence that stays finite: a loss or KL that grows past train.divergence_factor times its
running median stops the run before the diverged weights are saved. Watched where the host reads
the statistics anyway: at epoch ends (against the earlier epochs' means) and at log points
(against the earlier log points', once there are MIN_LOG_READINGS of them: a VAE's KL often spikes
by a few hundred times in its first steps, then settles)."""

from __future__ import annotations

import statistics

from imgvae.runtime import RunError

WATCHED = ("loss", "kl")  # a KL is >= 0; a loss is watched while its median is positive (a learned sigma may not be)


class Diverged(RunError):
    """A watched statistic grew past the divergence factor of its running median."""


MIN_LOG_READINGS = 5


class DivergenceWatch:
    def __init__(self, factor: float, window: int = 50):
        self.factor, self.window = factor, window
        self.seen = {f"{kind}/{name}": [] for kind in ("epoch", "step") for name in WATCHED}

    def observe(self, where: str, stats: dict[str, float], epoch: bool = False) -> None:
        """Take in one reading (a log point's, or with epoch an epoch's, means); raise Diverged when
        one of them is over factor x the median of the readings of its kind before it."""
        if not self.factor:
            return
        for name in WATCHED:
            value, before = stats.get(name), self.seen[f"{'epoch' if epoch else 'step'}/{name}"]
            if value is None:
                continue
            enough = len(before) >= (1 if epoch else MIN_LOG_READINGS)
            median = statistics.median(before) if enough else None
            if median is not None and median > 0 and value > self.factor * median:
                raise Diverged(f"{where}: {name} {value:,.4g} is {value / median:,.3g}x its running median "
                               f"{median:,.4g} (train.divergence_factor={self.factor:g})")
            before.append(value)
            del before[:-self.window]

    def state_dict(self) -> dict:
        return {"divergence_seen": {k: list(v) for k, v in self.seen.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seen.update({k: list(v) for k, v in state.get("divergence_seen", {}).items()})
