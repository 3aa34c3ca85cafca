"""How long the command line takes to answer before any work: `--help`, a verb's `--help`, an
argument error, a bad key (which reads the config, still without torch). Median of 5 runs each.

    python bench/cli_speed.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CASES = {
    "imgvae --help": ["--help"],
    "imgvae train --help": ["train", "--help"],
    "imgvae --version": ["--version"],
    "an unknown option": ["train", "--bogus"],
    "a misspelt key": ["train", "-o", "/tmp/imgvae-cli-speed", "train.epochz=3"],
}


def main() -> None:
    print("| command | seconds (median of 5) |\n|---|---:|")
    for name, args in CASES.items():
        times = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "imgvae", *args], capture_output=True)
            times.append(time.perf_counter() - started)
        print(f"| {name} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
