"""Reading, checking and writing a run's config: YAML files and presets, KEY=VALUE overrides,
every value checked (types, ranges, finite numbers) before any work; keys that moved between
sections, and old runs' flat model sections, read from where they were, so old runs' config.yaml
loads."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from imgvae.config.checks import ConfigError, validate
from imgvae.config.sections import MODEL_CONFIGS, Config, ModelConfig
from imgvae.rundir import write_text_atomic

PRESET_DIR = Path(__file__).parent.parent / "configs"


def _describe(tp) -> str:
    """A type as an error message names it: an integer, a number, 'auto', null, a list."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", bool: "true/false", str: "text", type(None): "null"}
    return names.get(tp, "a list" if typing.get_origin(tp) in (list, tuple) else str(tp))


def _coerce(value, tp, key: str):
    """Check/convert a YAML value to the annotated type, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_describe(arg) for arg in args)}")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    if cls is ModelConfig:
        cls, values = _model_section(values, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown and prefix == "model.":
        more = f" (also unknown: {['model.' + k for k in unknown[1:]]})" if unknown[1:] else ""
        raise ConfigError(f"model.{unknown[0]} is not a key of model {values.get('name', 'seed')!r}; its keys: "
                          f"{names}{more}")
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid keys in {prefix.rstrip('.') or 'config'}: {names}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    cfg = cls(**kwargs)
    validate(cfg, prefix)
    return cfg


# Every key of the one flat model section that run folders before 2026-12-01 saved (0.1.0's
# had these, later ones more): such a section is read as the architecture it names.
FLAT_MODEL_KEYS = {"name", "latent_dim", "bn_momentum", "base_channels", "levels", "blocks", "latent_channels"}


def _model_section(values: dict, prefix: str) -> tuple[type, dict]:
    """The section class of values["name"] and its values; a whole flat section saved by an
    older run keeps only the keys of its model."""
    name = values.get("name", "seed")
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}name: expected a string, got {name!r}")
    cls = MODEL_CONFIGS.get(name, ModelConfig)  # an unknown name: models.build_model lists the known ones
    if FLAT_MODEL_KEYS <= set(values):
        kept = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in kept}
    return cls, values


def to_dict(cfg) -> dict:
    """A Config, or one of its sections, as a plain dict (tuples as lists) that round-trips
    through YAML and JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


# Keys that moved to another section: (old section, key) -> (new section, key).
MOVED_KEYS = {
    ("train", "grid_size"): ("eval", "grid_size"),
    ("train", "final_eval"): ("eval", "after_training"),
    ("train", "prior_components"): ("prior", "components"),
}


def _moved(section: str, key: str, value) -> list[tuple[str, str, object]]:
    """Where an old setting lives now: [(section, key, value)] (itself when it did not move)."""
    if (section, key) == ("train", "prior_images"):  # N > 0 meant "fit on N images after training"
        on = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return [("prior", "after_training", on)] + ([("prior", "images", value)] if on else [])
    return [(*MOVED_KEYS.get((section, key), (section, key)), value)]


def _migrate(values: dict) -> dict:
    """A config mapping with old keys moved to their new places (older runs' config.yaml)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    train = values.get("train")
    if not isinstance(train, dict):
        return values
    for key in [k for k in train if ("train", k) in MOVED_KEYS or k == "prior_images"]:
        for section, new_key, value in _moved("train", key, train.pop(key)):
            target = values.setdefault(section, {})
            if isinstance(target, dict):  # else _build reports the bad section
                if new_key in target:
                    raise ConfigError(f"train.{key} is now {section}.{new_key}: give only the new key")
                target[new_key] = value
    return values


def from_dict(values: dict) -> Config:
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping, got {values!r}")
    return _build(Config, _migrate(values))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """["train.epochs=3", "data.train=[a.zip,b.zip]"] -> nested dict (values parsed as YAML;
    old keys moved to their new places; a later string wins)."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        path = key.split(".")
        for *where, moved_value in _moved(*path, value) if len(path) == 2 else [(*path, value)]:
            _assign(nested, where, moved_value, item)
    return nested


def _assign(nested: dict, path: list[str], value, item: str) -> None:
    node = nested
    *parents, leaf = path
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r} conflicts with another override")
    node[leaf] = value


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a shipped preset ("seed", "demo")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a preset {presets}")


def read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def _override_values(overrides: list[str] | dict | None) -> dict:
    """"section.key=value" strings, or a nested dict such as {"eval": {"limit": 4}} -> nested
    dict, old keys moved to their new places."""
    return _migrate(overrides) if isinstance(overrides, dict) else parse_overrides(list(overrides or []))


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file (path or preset name) <- overrides (strings or a nested dict)."""
    values = _migrate(read_yaml(resolve_config_path(path))) if path is not None else {}
    return from_dict(_deep_merge(values, _override_values(overrides)))


def merge_overrides(*overrides: list[str] | dict | None) -> dict:
    """Several sets of overrides (strings or nested dicts) as one nested dict; later ones win."""
    merged: dict = {}
    for values in overrides:
        merged = _deep_merge(merged, _override_values(values))
    return merged


def with_overrides(cfg: Config, overrides: list[str] | dict | None) -> Config:
    """cfg with overrides (strings or a nested dict) applied and checked."""
    return from_dict(_deep_merge(to_dict(cfg), _override_values(overrides))) if overrides else cfg


def save_config(cfg: Config, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
