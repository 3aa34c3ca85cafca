"""The layout of a run folder, its JSON Lines records and whole-or-nothing writes; no torch,
so the report reads runs without loading it.

    OUT/config.yaml  history.jsonl  steps.jsonl  summary.json  metrics.json  report.html
    OUT/checkpoints/  OUT/grids/  OUT/logs/ (TensorBoard, unless -l LOGS)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imgvae.errors import ImgvaeError

CONFIG, HISTORY, STEPS = "config.yaml", "history.jsonl", "steps.jsonl"
SUMMARY, METRICS, REPORT = "summary.json", "metrics.json", "report.html"
CHECKPOINTS, GRIDS, LOGS = "checkpoints", "grids", "logs"
# The seed's three pictures, written every epoch as grids/epoch_NNN_<kind>.png.
GRID_KINDS = ("ground_truth", "reconstructions", "samples")


class CheckpointError(ImgvaeError, ValueError):
    """A checkpoint, or a file kept with one (a fitted prior), that is missing, truncated,
    foreign or from another format."""


def epoch_grid(run: Path, epoch: int, kind: str) -> Path:
    return Path(run) / GRIDS / f"epoch_{epoch:03d}_{kind}.png"


def prior_grid(title: str) -> str:
    """The picture of a prior's samples of the final weights, in grids/: fitted_prior_samples.png, ..."""
    return f"{title.replace(' ', '_')}_samples.png"


def recorded(run: Path, path: Path) -> str:
    """A path as a run folder records it: relative to the folder when inside it (a run folder can be
    copied or moved and resumed there), else absolute (e.g. TensorBoard logs given with -l)."""
    path, run = Path(path).absolute(), Path(run).absolute()
    return str(path.relative_to(run)) if path.is_relative_to(run) else str(path)


def resolved(run: Path, path: str) -> Path:
    """A path a run folder recorded (recorded), as a path to use: relative ones are in the run folder.
    Runs before relative paths recorded their own logs/ absolutely: a copy of such a run uses its own."""
    path = Path(path)
    if not path.is_absolute():
        return Path(run) / path
    if path.name == LOGS and path.parent.absolute() != Path(run).absolute():
        return Path(run) / LOGS
    return path


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON Lines file; [] when it does not exist. A last line cut short
    (a crash or a full disk while appending) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines]


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a failed write (a full disk) leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Keep only the records with record[key] <= last (those a resumed run has not redone)."""
    if Path(path).exists():
        kept = [r for r in read_jsonl(path) if r[key] <= last]
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None
