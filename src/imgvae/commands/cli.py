"""`imgvae` command line: parses the arguments (parser.py), then runs the verb (handlers.py)."""

from __future__ import annotations

import sys

from imgvae.commands.parser import build_parser, parse_args
from imgvae.errors import ImgvaeError

__all__ = ["build_parser", "main", "parse_args"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from imgvae.commands.handlers import COMMANDS  # the library: after parsing, so --help is quick
        from imgvae.data.datasets import SkippedFile
        from imgvae.runtime import one_line_warnings

        with one_line_warnings(SkippedFile):
            COMMANDS[args.command](args)
    except ImgvaeError as e:
        stopped = getattr(e, "exit_code", None)  # runtime.Stopped: by a signal, with a checkpoint to resume from
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
    except KeyboardInterrupt:
        print("imgvae: interrupted; the last finished checkpoint is kept", file=sys.stderr)
        return 130
    return 0
