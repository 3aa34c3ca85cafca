"""What a resumed run may change: its architecture, likelihood, preprocessing, optimiser and the
positions of its steps stay as its checkpoints were made (everything else may change: epochs,
learning rate, time limit, data sources, ...)."""

from __future__ import annotations

from imgvae.config.fields import ConfigError
from imgvae.config.load import to_dict
from imgvae.config.run_config import Config

FIXED_ON_RESUME = ("loss.likelihood", "loss.sigma", "data.image_size", "data.crop", "data.crop_size",
                   "data.crop_scale", "data.exact_decode", "data.exif_transpose", "data.views_per_image",
                   "train.optimizer", "train.batch_size", "train.grad_accum", "train.seed")
ON_OR_OFF_ON_RESUME = ("train.ema", "loss.adversarial", "loss.align")  # their weights exist or not


def flat(values: dict, prefix: str = "") -> dict:
    """{"model": {"name": "seed"}} -> {"model.name": "seed"}."""
    out = {}
    for k, v in values.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def refuse_changes(saved: Config, cfg: Config) -> None:
    """Refuse, in one line naming each key with both values, a resume that changes what the run's
    checkpoints were made with (FIXED_ON_RESUME, every model key, the EMA and GAN being on)."""
    before, after = flat(to_dict(saved)), flat(to_dict(cfg))
    keys = [k for k in sorted(set(before) | set(after)) if k.startswith("model.") and k != "model.pretrained"]
    changed = [k for k in [*keys, *FIXED_ON_RESUME] if before.get(k) != after.get(k)]
    changed += [k for k in ON_OR_OFF_ON_RESUME if (before[k] > 0) != (after[k] > 0)]
    _refuse(changed, before, after)


def refuse_changed_overrides(saved: Config, overrides: dict) -> None:
    """The same refusal for KEY=VALUE overrides of a resume, before they are applied (a model key
    of another architecture would otherwise be refused as unknown, not as a change)."""
    before, asked = flat(to_dict(saved)), flat(overrides)
    fixed = [k for k in asked if k.startswith("model.") and k != "model.pretrained" or k in FIXED_ON_RESUME]
    _refuse([k for k in fixed if before.get(k) != asked[k]], before, asked)


def _refuse(changed: list[str], before: dict, after: dict) -> None:
    if changed:
        said = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume cannot change what the run was made with ({said}); "
                          "start a new run with -o, or resume with the run's values")
