"""Every config key with its type, bounds, default and help, read from the fields themselves:
what `imgvae config` prints and the documentation's config reference shows (never written twice)."""

from __future__ import annotations

import dataclasses
import typing

from imgvae.config.fields import ConfigError, reference
from imgvae.config.model_sections import MODEL_CONFIGS
from imgvae.config.prior_sections import PRIOR_CONFIGS
from imgvae.config.run_config import Config


def sections() -> list[tuple[str, type, str]]:
    """(title, section class, key prefix) of every section, one per architecture and per kind of prior."""
    out = []
    for f in dataclasses.fields(Config):
        if f.name == "model":
            names = {}
            for name, cls in MODEL_CONFIGS.items():
                names.setdefault(cls, []).append(name)
            out += [(f"model ({', '.join(n)})", cls, "model.") for cls, n in names.items()]
        elif f.name == "prior":
            out += [(f"prior (kind {name}: the {cls.title})", cls, "prior.") for name, cls in PRIOR_CONFIGS.items()]
        else:
            out.append((f.name, f.default_factory, f"{f.name}."))
    return out


def field_of(key: str) -> tuple[dataclasses.Field, object]:
    """The field of a config key ("eval.iw_samples"; a prior key: of the first kind that has it) and its type."""
    prefix, _, name = key.partition(".")
    for _, cls, section in sections():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if section == f"{prefix}." and name in fields:
            return fields[name], typing.get_type_hints(cls)[name]
    raise KeyError(key)


def config_reference(only: str | None = None) -> list[tuple[str, list[dict]]]:
    """(section title, rows of fields.reference) of every section, or of those whose keys start with
    `only` ("train", "prior.width", ...); ConfigError when none does."""
    found = []
    for title, cls, prefix in sections():
        rows = [r for r in reference(cls, prefix) if only is None or r["key"] == only or r["key"].startswith(
            only.rstrip(".") + ".")]
        if rows:
            found.append((title, rows))
    if not found:
        keys = sorted({prefix.rstrip(".") for _, _, prefix in sections()})
        raise ConfigError(f"no config key or section {only!r}; the sections: {keys}")
    return found


def format_reference(found: list[tuple[str, list[dict]]]) -> str:
    """The reference as plain text, a block per key."""
    lines = []
    for title, rows in found:
        lines.append(f"[{title}]")
        for r in rows:
            bounds = f", {r['bounds']}" if r["bounds"] else ""
            lines.append(f"  {r['key']} = {r['default']!r}  ({r['type']}{bounds})")
            lines.append(f"      {r['help']}")
    return "\n".join(lines)
