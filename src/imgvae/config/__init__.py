"""A run's config: one frozen, typed config read from YAML and KEY=VALUE overrides, every value
checked before any work. Each key's type, bounds and help sit on its field (fields.key); the
sections are in sections.py, model_sections.py (one per architecture) and prior_sections.py (one
per kind of prior); load.py reads and writes them; resume.py says what a resume may change.
Everything is importable from here."""

from imgvae.config.fields import ConfigError, reference
from imgvae.config.load import (
    PRESET_DIR,
    from_dict,
    load_config,
    merge_overrides,
    parse_overrides,
    read_yaml,
    resolve_config_path,
    save_config,
    section_of,
    to_dict,
    with_overrides,
    with_prior_kind,
)
from imgvae.config.model_sections import (
    MODEL_CONFIGS,
    AutoencoderKLConfig,
    KLConfig,
    ModelConfig,
    QuantizedConfig,
    ResNetConfig,
    SeedConfig,
    model_config,
)
from imgvae.config.prior_sections import (
    PRIOR_CONFIGS,
    FlowConfig,
    GMMConfig,
    LearnedPriorConfig,
    PriorConfig,
    TokenConfig,
)
from imgvae.config.run_config import Config
from imgvae.config.sections import (
    DataConfig,
    EvalConfig,
    LossConfig,
    Recipe,
    TrainConfig,
    center_crop_size,
)

__all__ = [
    "PRESET_DIR", "ConfigError", "from_dict", "load_config", "merge_overrides", "parse_overrides", "read_yaml",
    "reference", "resolve_config_path", "save_config", "section_of", "to_dict", "with_overrides", "with_prior_kind",
    "MODEL_CONFIGS",
    "AutoencoderKLConfig", "Config", "DataConfig", "EvalConfig", "KLConfig", "LossConfig", "ModelConfig",
    "PriorConfig", "GMMConfig", "FlowConfig", "TokenConfig", "LearnedPriorConfig", "PRIOR_CONFIGS",
    "QuantizedConfig", "Recipe", "ResNetConfig", "SeedConfig", "TrainConfig", "center_crop_size", "model_config",
]
