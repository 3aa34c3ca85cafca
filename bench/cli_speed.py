"""How long the command line takes to answer before any work: `--help`, a verb's `--help`, an
argument error, a bad key (which reads the config, still without torch), a missing checkpoint;
and what a verb pays before its work, the import of its library, with torchmetrics beside it (as
before it was imported only where metrics are computed). Median of 5 runs each.

    python bench/cli_speed.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CLI = ["-m", "imgvae"]
CASES = {
    "imgvae --help": [*CLI, "--help"],
    "imgvae train --help": [*CLI, "train", "--help"],
    "imgvae --version": [*CLI, "--version"],
    "an unknown option": [*CLI, "train", "--bogus"],
    "a misspelt key": [*CLI, "train", "-o", "/tmp/imgvae-cli-speed", "train.epochz=3"],
    "a missing checkpoint": [*CLI, "sample", "/no/such/run", "-o", "/tmp/imgvae-cli-speed"],
    "the verbs' library (a verb's start)": ["-c", "import imgvae.commands.handlers"],
    "the same with torchmetrics": ["-c", "import imgvae.commands.handlers, torchmetrics.functional.image"],
}


def main() -> None:
    print("| command | seconds (median of 5) |\n|---|---:|")
    for name, args in CASES.items():
        times = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run([sys.executable, *args], capture_output=True)
            times.append(time.perf_counter() - started)
        print(f"| {name} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
