"""Reading, checking and writing a run's config: YAML files and presets, KEY=VALUE overrides,
every value checked (types, ranges, finite numbers: each field's own rule, config/fields.py)
before any work; keys that moved between sections, and old runs' flat model and prior sections,
read from where they were, so old runs' config.yaml loads."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from imgvae.config.fields import ConfigError, check_bounds, coerce
from imgvae.config.model_sections import MODEL_CONFIGS, ModelConfig
from imgvae.config.prior_sections import PRIOR_CONFIGS, PriorConfig
from imgvae.config.run_config import Config
from imgvae.rundir import write_text_atomic

PRESET_DIR = Path(__file__).parent.parent / "configs"


MAX_DEPTH = 16  # nesting of a config value: deeper is a typo or an attack (Python's recursion ends near 1000)


def _depth(value) -> int:
    """How deeply a YAML value nests lists and mappings, counted without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        node, level = todo.pop()
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
            todo += [(child, level + 1) for child in children]
    return deepest


def _section_class(cls, values: dict, prefix: str) -> tuple[type, dict]:
    """The class of a section whose class a key chooses (model.name, prior.kind) and its values."""
    if cls is ModelConfig:
        return _model_section(values, prefix)
    if cls is PriorConfig:
        return _prior_section(values, prefix)
    return cls, values


def validate(cfg, prefix: str) -> None:
    """A section, built from its values, checked: each field's bounds, then the rules that tie its
    keys together (its check()); ConfigError names the first bad key."""
    check_bounds(cfg, prefix)
    try:
        cfg.check() if hasattr(cfg, "check") else None
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    cls, values = _section_class(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    chooser = {"model.": ("name", "model", "seed"), "prior.": ("kind", "prior", "gmm")}.get(prefix)
    if unknown and chooser:
        by, section, default = chooser
        more = f" (also unknown: {[prefix + k for k in unknown[1:]]})" if unknown[1:] else ""
        raise ConfigError(f"{prefix}{unknown[0]} is not a key of {section} {values.get(by, default)!r}; its keys: "
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
            kwargs[name] = coerce(value, tp, prefix + name)
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


# Every key of the one prior section that run folders of 2026-12-01 to 2026-12-06 saved, whatever the kind
# (later ones more): such a section is read as the kind it names.
FLAT_PRIOR_KEYS = {"after_training", "kind", "images", "components", "backbone", "width", "depth", "time_sampling",
                   "view_epochs", "epochs", "batch_size", "lr", "ema", "steps", "solver"}


def _prior_section(values: dict, prefix: str) -> tuple[type, dict]:
    """The section class of values["kind"] and its values; a whole flat section saved by an older
    run keeps only the keys of its kind."""
    kind = values.get("kind", "gmm")
    if not isinstance(kind, str) or kind not in PRIOR_CONFIGS:
        raise ConfigError(f"{prefix}kind: {kind!r} is not one of {list(PRIOR_CONFIGS)}")
    cls = PRIOR_CONFIGS[kind]
    if FLAT_PRIOR_KEYS <= set(values):
        kept = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in kept}
    return cls, values


def section_of(cls, values: dict, prefix: str):
    """One section (e.g. a learned prior run's own) built from its values and checked."""
    return _build(cls, values, prefix)


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
    if _depth(values) > MAX_DEPTH:
        raise ConfigError(f"config: values nested more than {MAX_DEPTH} levels deep")
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
        value = _yaml_value(raw, f"override {key}")
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


def _yaml_value(text: str, where: str):
    """YAML text parsed, or one line naming where it came from and the line of the fault; values
    nested beyond MAX_DEPTH refused (PyYAML and the checks recurse)."""
    if not text.strip():
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}:{at} not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested more than {MAX_DEPTH} levels deep") from None
    if _depth(value) > MAX_DEPTH:
        raise ConfigError(f"{where}: values nested more than {MAX_DEPTH} levels deep")
    return value


def read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    values = _yaml_value(text, str(path)) or {}
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


def with_prior_kind(cfg: Config, kind: str) -> Config:
    """cfg with a prior section of `kind`: its own when it is of that kind, else that kind's defaults."""
    if cfg.prior.kind == kind:
        return cfg
    if kind not in PRIOR_CONFIGS:
        raise ConfigError(f"prior.kind: {kind!r} is not one of {list(PRIOR_CONFIGS)}")
    return dataclasses.replace(cfg, prior=PRIOR_CONFIGS[kind]())


def save_config(cfg: Config, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
