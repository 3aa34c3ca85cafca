"""A config key's rule beside the key: `key(default, gt=..., ge=..., le=..., help=...)` declares a
section's field with its bounds and its help text; `coerce` checks a YAML value against the
field's type (NaN and infinities refused for every number), `check_bounds` against its bounds.
Error messages, the parser's help and the config reference are made from these declarations."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Literal

from imgvae.errors import ImgvaeError


class ConfigError(ImgvaeError, ValueError):
    """A config file, key or value that cannot be used."""


BOUNDS = ("gt", "ge", "lt", "le")  # the one range vocabulary: > low, >= low, < high, <= high
SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def key(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, help: str, gt=None, ge=None, lt=None,
        le=None):
    """A config field: its default (or a factory for lists), bounds that apply to its numbers
    (a bool or a word such as "auto" is not a number), and one line of help."""
    rule = {"help": help, **{k: v for k, v in zip(BOUNDS, (gt, ge, lt, le)) if v is not None}}
    return dataclasses.field(default=default, default_factory=factory, metadata=rule)


def like(cls, name: str, default):
    """The field `name` of section `cls` with another default (a section that shares a key's rule
    and help, e.g. a learned prior's training recipe)."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=base.metadata)
    return dataclasses.field(default=default, metadata=base.metadata)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bounds_text(meta: typing.Mapping) -> str:
    """"> 0, <= 10" for a field's rule ("" when it has none)."""
    return ", ".join(f"{SYMBOLS[b]} {meta[b]:,}" if is_number(meta[b]) else f"{SYMBOLS[b]} {meta[b]}"
                     for b in BOUNDS if b in meta)


def check_bounds(cfg, prefix: str) -> None:
    """Every numeric field of a section within its declared bounds; ConfigError names the key."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if not is_number(value):
            continue
        if "gt" in meta and not value > meta["gt"]:
            raise ConfigError(f"{prefix}{f.name} must be > {meta['gt']}, got {value}")
        if "ge" in meta and not value >= meta["ge"]:
            raise ConfigError(f"{prefix}{f.name} must be >= {meta['ge']}, got {value}")
        if "lt" in meta and not value < meta["lt"]:
            raise ConfigError(f"{prefix}{f.name} must be < {meta['lt']}, got {value}")
        if "le" in meta and not value <= meta["le"]:
            raise ConfigError(f"{prefix}{f.name} must be <= {meta['le']:,}, got {value:,}")


def describe(tp) -> str:
    """A type as an error message and the reference name it: an integer, a number, 'auto', null, a list."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        inner = {int: "integers", float: "numbers", str: "strings"}.get(typing.get_args(tp)[0], "values")
        return f"a list of {inner}"
    if typing.get_origin(tp) is tuple:
        return f"{len(typing.get_args(tp))} numbers"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "text", type(None): "null"}
    return names.get(tp, str(tp))


def _scalar(value, tp, name: str):
    """A YAML scalar as type tp (bool, int, float, str, None), or ConfigError."""
    if tp is type(None) and value is None:
        return None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and is_number(value) and isinstance(value, int):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if is_number(value):
            if not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
    raise ConfigError(f"{name}: expected {describe(tp).replace('text', 'a string')}, got {value!r}")


def coerce(value, tp, name: str):
    """Check / convert a YAML value to the annotated type tp, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: {value!r} is not {describe(tp)}")
    if origin is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [coerce(v, args[0], name) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, name) for v, a in zip(value, args))
    return _scalar(value, tp, name)


def reference(cls, prefix: str) -> list[dict]:
    """Every key of a section: {key, type, default, bounds, help}, as the docs and `imgvae config` list them."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append({"key": prefix + f.name, "type": describe(hints[f.name]), "default": default,
                     "bounds": bounds_text(f.metadata), "help": f.metadata.get("help", "")})
    return rows
