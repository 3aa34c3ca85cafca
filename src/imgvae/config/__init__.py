"""A run's config: one frozen, typed config (sections.py) read from YAML and KEY=VALUE overrides,
every value checked before any work (load.py). Everything is importable from here."""

from imgvae.config.load import (
    PRESET_DIR,
    ConfigError,
    from_dict,
    load_config,
    merge_overrides,
    parse_overrides,
    read_yaml,
    resolve_config_path,
    save_config,
    to_dict,
    with_overrides,
)
from imgvae.config.sections import (
    MODEL_CONFIGS,
    AutoencoderKLConfig,
    Config,
    DataConfig,
    EvalConfig,
    KLConfig,
    LossConfig,
    ModelConfig,
    PriorConfig,
    QuantizedConfig,
    ResNetConfig,
    SeedConfig,
    TrainConfig,
    center_crop_size,
    model_config,
)

__all__ = [
    "PRESET_DIR", "ConfigError", "from_dict", "load_config", "merge_overrides", "parse_overrides", "read_yaml",
    "resolve_config_path", "save_config", "to_dict", "with_overrides", "MODEL_CONFIGS", "AutoencoderKLConfig",
    "Config", "DataConfig", "EvalConfig", "KLConfig", "LossConfig", "ModelConfig", "PriorConfig", "QuantizedConfig",
    "ResNetConfig", "SeedConfig", "TrainConfig", "center_crop_size", "model_config",
]
