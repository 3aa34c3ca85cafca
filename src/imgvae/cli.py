"""`imgvae` command line: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cache import prepare
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .sources import SourceError
from .train import RunError, train

EPILOG_TRAIN = """\
overrides: any config key as section.key=value, e.g.
  train.epochs=3 model.latent_dim=64 data.train=[coco/train2017.zip,coco/test2017.zip]
sections and keys: see configs/seed.yaml; presets: seed, demo (or a YAML path).

examples:
  imgvae train --config demo -o runs/demo
  imgvae train --config seed -o runs/seed -l runs/seed-logs data.train=[/data/coco/train2017.zip]
  imgvae train --resume runs/seed train.epochs=30
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgvae", description="Train, inspect and compare VAEs on natural-scene images."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser(
        "train", help="train a VAE (writes checkpoints, picture grids, TensorBoard logs)",
        description="Train a VAE. Each epoch writes ground-truth / reconstruction / prior-sample grids "
        "and a checkpoint to OUT.", epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("-o", "--out", metavar="OUT", help="results folder (config, checkpoints, grids, history)")
    t.add_argument("-l", "--logs", metavar="LOGS", help="TensorBoard log folder (default: OUT/logs)")
    t.add_argument("-c", "--config", metavar="FILE", help="YAML config file or preset name (seed, demo)")
    t.add_argument("--resume", metavar="OUT", help="continue the run in this results folder")
    t.add_argument("--seed", type=int, help="random seed (same as train.seed=N)")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (same as train.device=...)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in log files)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    p = sub.add_parser(
        "prepare", help="preprocess a dataset once into a fast uint8 cache",
        description="Decode, crop and resize every image of the configured sources once, in parallel, "
        "into CACHE (images.npy + keys.txt + manifest.json). Interrupted? Run the same command again: "
        "it resumes. Train on it with data.train=[CACHE] (and data.eval=[EVAL_CACHE]).",
        epilog="examples:\n"
        "  imgvae prepare --config seed -o cache/coco-train          # data.train: train2017 + test2017\n"
        "  imgvae prepare --config seed --split eval -o cache/coco-val\n"
        "  imgvae train --config seed -o runs/seed data.train=[cache/coco-train] data.eval=[cache/coco-val]\n"
        "  imgvae prepare -o cache/mine data.train=[~/photos] data.image_size=128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--out", metavar="CACHE", required=True, help="cache folder to create")
    p.add_argument("-c", "--config", metavar="FILE", help="YAML config file or preset name (seed, demo)")
    p.add_argument("--split", choices=["train", "eval"], default="train", help="prepare data.train (default) or data.eval")
    p.add_argument("--workers", type=int, help="processes (default: all CPU cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def _prepare_command(args) -> None:
    cfg = load_config(args.config, args.overrides)
    specs = cfg.data.train if args.split == "train" else cfg.data.eval
    manifest = prepare(specs, cfg.data, args.out, workers=args.workers, progress=not args.no_progress)
    print(f"imgvae: {args.out}: {manifest['count']:,} images of {cfg.data.image_size}x{cfg.data.image_size} "
          f"({manifest['rows'] - manifest['count']} unreadable files skipped, listed in manifest.json)")


def _train_command(args) -> None:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; change keys with KEY=VALUE instead of --config")
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("give the run folder once: --resume OUT (without a different -o)")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"{args.resume} is not a run folder (no config.yaml)")
        cfg = load_config(saved, overrides)
        train(cfg, args.resume, args.logs, resume=True, progress=not args.no_progress)
    else:
        if not args.out:
            raise ConfigError("imgvae train needs -o OUT (or --resume OUT)")
        cfg = load_config(args.config, overrides)
        train(cfg, args.out, args.logs, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            _train_command(args)
        elif args.command == "prepare":
            _prepare_command(args)
    except (ConfigError, SourceError, CheckpointError, RunError) as e:
        print(f"imgvae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgvae: interrupted; the last finished checkpoint is kept", file=sys.stderr)
        return 130
    return 0
