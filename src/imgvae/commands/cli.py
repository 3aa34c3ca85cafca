"""`imgvae` command line: parses the arguments (parser.py), then runs the verb (handlers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from imgvae.commands.parser import build_parser, config_overrides, parse_args
from imgvae.config import load_config
from imgvae.config.reference import config_reference, format_reference
from imgvae.errors import ImgvaeError, ImgvaeWarning
from imgvae.rundir import CONFIG, CheckpointError

__all__ = ["build_parser", "main", "parse_args"]


def refuse_missing_paths(args) -> None:
    """A checkpoint or run folder that is not there: one line before the library (torch) is imported."""
    checkpoint = getattr(args, "checkpoint", None)
    if isinstance(checkpoint, str) and not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint!r} does not exist")
    run = args.resume if args.command == "train" else getattr(args, "run_dir", None)
    if run and not (Path(run) / CONFIG).is_file():
        raise CheckpointError(f"{run} is not a run folder (no {CONFIG})")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse said why, in one line (parser.Parser); --help and --version exit 0
        if e.code:
            return e.code
        raise
    try:
        if args.command == "config":  # the reference, read from the config's fields: no torch
            print(format_reference(config_reference(args.key)))
            return 0
        refuse_missing_paths(args)
        if args.command in ("train", "prepare") and not getattr(args, "resume", None):
            # A bad key or value: one line before the library (torch) is imported; the verb reads it again.
            load_config(args.config, config_overrides(args, flags_win=True))
        from imgvae.commands.handlers import COMMANDS  # the library: after parsing, so --help is quick
        from imgvae.runtime import one_line_warnings

        with one_line_warnings(ImgvaeWarning):
            COMMANDS[args.command](args)
    except ImgvaeError as e:
        stopped = getattr(e, "exit_code", None)  # Stopped: by a signal, with a checkpoint to resume from
        if stopped is not None:
            from imgvae.runtime import is_main_process

            if is_main_process():  # under torchrun every process stops; one says so
                print(f"imgvae: {e}", file=sys.stderr)
            return stopped
        print(f"imgvae: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder, a missing file
        print(f"imgvae: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training says what it kept (train.processes.Interrupted)
        print(f"imgvae: {getattr(e, 'message', 'interrupted')}", file=sys.stderr)
        return 130
    return 0
