"""The pieces every verb's parser is made of: a parser that refuses in one line, bounded numbers,
options that set a config key (their type and help are the key's own), the KEY=VALUE items, and
collecting all of those into the config overrides (parse_args, config_overrides)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

from imgvae.config import PRESET_DIR, Config, merge_overrides
from imgvae.config.reference import field_of

RAW = argparse.RawDescriptionHelpFormatter
PRESETS = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))  # every shipped preset


class Parser(argparse.ArgumentParser):
    """argparse, with a refusal in one line: "imgvae VERB: error: MESSAGE (see imgvae VERB --help)"."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float, high: float, low_open: bool = False):
    """An argparse type: a finite `kind` from low (or above it, when low_open) to high."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (value > low if low_open else value >= low) or not value <= high:  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g} and <= {high:,}, "
                                             f"got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


SEED = number(int, 0, 2**31 - 1)
MAX_SAMPLES = 1_000_000  # -n: images written one block at a time (verbs.SAMPLE_BLOCK), so memory stays flat


def config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help=f"YAML config file or preset name ({PRESETS})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def use_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the run's data, eval and prior keys, e.g. data.crop_size=500")


def key_option(parser: argparse.ArgumentParser, flag: str, key: str, metavar: str | None = None,
                default: str | None = None) -> None:
    """An option that sets config key `key` (config_overrides reads it): its type and help are the
    key's own (its field's); `default` says where its value comes from when not given."""
    field, tp = field_of(key)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    kind = {"nargs": "+"} if typing.get_origin(args[0]) is list else {"type": args[0]}
    where = f"; default: {default}" if default else ""
    dest = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, dest=dest, metavar=metavar, help=f"{field.metadata['help']} ({key}{where})", **kind)
    parser.set_defaults(config_keys={**(parser.get_default("config_keys") or {}), dest: key})


def device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def common(parser: argparse.ArgumentParser, seed_help: str = "random seed (default 0): same seed, same output",
            seed_default: int | None = 0) -> None:
    parser.add_argument("--seed", type=SEED, default=seed_default, help=seed_help)
    device_args(parser)


def latent_scale_arg(p) -> None:
    p.add_argument("--latent-scale", choices=("keep", "recompute"), dest="latent_scale",
                   help="keep: the model's own scaling_factor / shift_factor (a diffusers folder's, or one it started "
                   "from); recompute: from these images' latents. Default: keep when the model has one. Both are "
                   "recorded")


OVERRIDE = re.compile(rf"^({'|'.join(f.name for f in dataclasses.fields(Config))})\.\w+=")
# Options whose values are lists: KEY=VALUE items given after them land in their list.
LISTS = ("data", "sample_reference", "images", "models")


def parse_with(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with every KEY=VALUE item in args.overrides, wherever it was given: among
    the positionals, after options (argparse alone would refuse those after `-o DIR` once the
    positionals were read), or after a list option such as --data SOURCE ... (where argparse puts
    it in that list)."""
    args, unknown = parser.parse_known_args(argv)
    items = [x for x in unknown if OVERRIDE.match(x)]
    takes = hasattr(args, "overrides") or hasattr(args, "models")
    if len(items) < len(unknown) or (items and not takes):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(getattr(args, "overrides", None) or []) + items
    for name in LISTS:
        listed = getattr(args, name, None) or []
        overrides += [x for x in listed if OVERRIDE.match(x)]
        setattr(args, name, [x for x in listed if not OVERRIDE.match(x)] or None)
    args.overrides = overrides
    return args


def config_overrides(args, flags_win: bool = False) -> dict:
    """The command line's config overrides as one nested dict: the options that set a key
    (_key_option) and the KEY=VALUE items; the items win unless flags_win."""
    values: dict = {}
    for dest, key in (getattr(args, "config_keys", None) or {}).items():
        if getattr(args, dest) is not None:
            section, _, name = key.partition(".")
            values.setdefault(section, {})[name] = getattr(args, dest)
    return merge_overrides(args.overrides, values) if flags_win else merge_overrides(values, args.overrides)
