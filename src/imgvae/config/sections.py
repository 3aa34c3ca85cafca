"""The typed sections of a run's config besides the model's and the prior's: data, loss, the
training recipe (what the engine reads, for any model it trains) and train, eval. Frozen
dataclasses whose fields carry their rule and help (fields.key); config/load.py reads them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from imgvae.config.fields import ConfigError, key

PIL_MAX_MEGAPIXELS = 178.9  # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (89,478,485) pixels
SEED_CROP_SIZE = 375
DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


@dataclass(frozen=True)
class DataConfig:
    train: list[str] = key(factory=lambda: ["embedded:train"], help="sources: image folders (recursive), .zip "
                           "files read in place (COCO's), prepared caches, embedded:train / embedded:eval (photos "
                           "shipped in installed wheels)")
    eval: list[str] = key(factory=lambda: ["embedded:eval"], help="held-out sources, as data.train ([]: none)")
    image_size: int = key(64, gt=0, le=4096, help="training resolution")
    crop: Literal["auto", "center", "random"] = key("auto", help="center: the seed's centre crop of crop_size "
                                                    "(clipped to the shorter side, never zero-padded); random: a "
                                                    "square of side U(crop_scale) x shorter side; auto: random for "
                                                    "the embedded photos, center for any other source")
    crop_size: int | Literal["auto"] = key("auto", gt=0, le=2**16, help="side of the centre crop (auto: the seed's "
                                           "375 px, or image_size when larger: a crop is never upscaled by default)")
    crop_scale: tuple[float, float] = key((0.25, 1.0), help="random crops: their side as a fraction of the shorter "
                                          "side, 0 < lo <= hi <= 1")
    exact_decode: bool = key(False, help="true: full JPEG decode, bit-identical to the seed; false: reduced-scale "
                             "decode (libjpeg DCT scaling), faster and close to exact")
    views_per_image: int | Literal["auto"] = key("auto", gt=0, le=10**5, help="distinct crops per image per epoch "
                                                 "(auto: 128 for the embedded photos, else 1)")
    eval_views_per_image: int | Literal["auto"] = key("auto", gt=0, le=10**5, help="held-out views per image (auto: "
                                                      "13 for the embedded photos, else 1)")
    hflip: bool = key(True, help="random horizontal flip, training only")
    eval_limit: int = key(0, ge=0, le=10**12, help="first N held-out images for the per-epoch loss (0 = all)")
    num_workers: int | Literal["auto"] = key("auto", ge=0, le=256, help="loader processes (auto: none when "
                                             "training on a CPU, min(8, cores) on a GPU)")
    memory_cache_gb: float = key(4.0, ge=0, le=2**20, help="GiB of RAM per split and machine for views that do not "
                                 "change between epochs, kept once decoded (0 = off)")
    device_cache_gb: float | Literal["auto"] = key("auto", ge=0, le=2**20, help="a training set from prepared caches "
                                                   "that fits is copied to the training device once and batched "
                                                   "there (auto: half the GPU's free memory; on a CPU, "
                                                   "memory_cache_gb; 0 = off)")
    max_file_mb: float = key(256.0, gt=0, le=2**20, help="larger files and zip members are skipped unread")
    max_megapixels: float = key(128.0, gt=0, le=PIL_MAX_MEGAPIXELS, help="larger images are skipped before decoding "
                                "(decompression bombs; at most PIL's own limit)")
    exif_transpose: bool = key(False, help="turn photos upright by their EXIF orientation (the seed did not)")
    labels: str = key("none", help="what each image is of, for a conditional prior: none; folders (the first "
                      "folder under each source, a zip's too; the embedded photos' own names); coco:PATH (COCO's "
                      "instances annotations, the zip or its json: the categories present, multi-hot); or a .csv "
                      "(file,label) or .jsonl ({file, labels}) file")

    def check(self) -> None:
        check_labels_spec(self.labels)
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not self.train:
            raise ConfigError("train needs at least one source")


def check_labels_spec(spec: str) -> None:
    """data.labels: none, folders, coco:PATH (a zip or a json), or a .csv / .jsonl file."""
    if spec in ("none", "folders") or spec.startswith("coco:") or spec.lower().endswith((".csv", ".jsonl")):
        return
    raise ConfigError(f"labels: {spec!r} is not none, folders, coco:PATH or a .csv / .jsonl file")


def center_crop_size(cfg: DataConfig) -> int:
    """The side of the centre crop data.crop_size asks for ("auto": see DataConfig)."""
    return max(SEED_CROP_SIZE, cfg.image_size) if cfg.crop_size == "auto" else cfg.crop_size


@dataclass(frozen=True)
class LossConfig:
    likelihood: Literal["gaussian", "l1", "logistic"] = key("gaussian", help="decoder likelihood p(x|z) on the "
                                                            "[-1, 1] scale: gaussian (the seed's), l1 (Laplace), "
                                                            "logistic (discretised over 256 levels, a log-scale per "
                                                            "subpixel)")
    sigma: Literal["fixed", "scalar", "pixel"] = key("fixed", help="gaussian noise level: fixed (sigma 1, the seed's "
                                                     "0.5 x squared error), learned as one scalar, or per pixel")
    beta: float = key(1.0, ge=0, le=1e6, help="weight of the KL term (beta-VAE); 1 is the plain ELBO")
    kl_warmup: float = key(0.0, ge=0, le=1, help="fraction of all steps over which the KL weight rises from 0 to beta")
    free_bits: float = key(0.0, ge=0, le=1e3, help="nats per latent dimension (batch mean) that cost nothing")
    perceptual: float = key(0.0, ge=0, le=1e6, help="weight of the EfficientNet-Lite0 perceptual distance (0 = off)")
    adversarial: float = key(0.0, ge=0, le=1e6, help="weight of the PatchGAN hinge loss, adaptive (0 = off)")
    adversarial_start: int = key(0, ge=0, le=10**12, help="the step the adversarial loss starts at")
    discriminator_lr: float = key(2e-4, gt=0, le=10, help="the discriminator's learning rate")
    align: float = key(0.0, ge=0, le=100, help="VA-VAE's alignment of a spatial continuous latent (kl-f4, kl-f8, "
                       "autoencoder-kl) to EfficientNet-Lite0's features of the images: the weight of its margin "
                       "cosine and distance-matrix terms, adaptively balanced against the reconstruction (VA-VAE: "
                       "0.1; 0 = off)")


@dataclass(frozen=True)
class Recipe:
    """What the training engine reads, for any model it trains: `train` for the autoencoder, a
    learned prior's own section for the prior."""

    section: ClassVar[str] = "train"  # how messages name its keys (train.time_limit, prior.time_limit)

    epochs: int = key(20, gt=0, le=10**6, help="epochs to train")
    batch_size: int = key(64, gt=0, le=2**16, help="examples per micro-batch and process")
    optimizer: Literal["rmsprop", "adam", "adamw"] = key("rmsprop", help="the optimiser")
    lr: float = key(1e-3, gt=0, le=10, help="learning rate")
    weight_decay: float = key(0.0, ge=0, le=10, help="weight decay")
    rmsprop_alpha: float = key(0.9, ge=0, le=1, help="RMSprop smoothing (the seed's 0.9)")
    betas: tuple[float, float] = key((0.9, 0.999), help="Adam(W) betas, each in [0, 1)")
    eps: float = key(1e-8, gt=0, le=1, help="the optimiser's epsilon")
    lr_gamma: float = key(0.75, gt=0, le=10, help="ExponentialLR factor applied after every epoch")
    seed: int = key(0, ge=0, le=2**31 - 1, help="seed of every random choice")
    device: str = key("auto", help="auto, cpu, cuda, cuda:N, mps or xpu")
    dist_backend: Literal["auto", "nccl", "gloo"] = key("auto", help="torchrun's process group: auto = NCCL on "
                                                        "GPUs, gloo on CPUs")
    log_every: int = key(20, gt=0, le=10**9, help="steps between logged statistics")
    ckpt_every: int = key(5, ge=0, le=10**6, help="keep every Nth epoch's checkpoint besides the last (0 = only the "
                          "last)")
    ckpt_every_steps: int = key(0, ge=0, le=10**12, help="also checkpoint every N steps inside an epoch, keeping the "
                                "newest (0 = epoch ends only)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = key("auto", help="autocast dtype (fp16 adds a GradScaler); "
                                                             "auto: bf16 where the device computes it natively "
                                                             "(Ampere GPUs, CPUs with AMX or AVX512-BF16), else fp32")
    compile: bool = key(False, help="torch.compile the training model")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = key(
        "default", help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    tf32: bool = key(True, help="CUDA: fp32 matmuls and convolutions on TF32 tensor cores")
    keep_freed_memory: bool = key(True, help="CPU: glibc keeps freed memory for reuse (faster steps; RSS stays at "
                                  "its peak)")
    grad_accum: int = key(1, gt=0, le=4096, help="micro-batches per optimiser step (per process)")
    grad_clip: float = key(0.0, ge=0, le=1e9, help="clip the gradient norm to this (0 = no clipping)")
    max_bad_steps: int = key(10, gt=0, le=10**6, help="non-finite steps in a row that stop the run")
    divergence_factor: float = key(1e8, ge=0, help="a loss or KL over this many times its running median "
                                   "stops the run before the diverged weights are saved (0 = off, else >= 2)")
    time_limit: float = key(0.0, ge=0, le=10**7, help="minutes of training, then a resumable checkpoint (0 = no "
                            "limit)")
    ema: float = key(0.0, ge=0, lt=1, help="EMA decay of the weights that make grids, evaluation and samples (0 = "
                     "off)")

    def check(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas are decays in [0, 1), got {list(self.betas)}")
        if 0 < self.divergence_factor < 2:
            raise ConfigError(f"divergence_factor is 0 (off) or a factor >= 2, got {self.divergence_factor}")
        if not DEVICE.match(self.device):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda, cuda:N, mps or xpu")


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The autoencoder's training: the engine's recipe and two keys of its own."""

    channels_last: bool = key(True, help="NHWC memory format: faster convolutions on CPUs and tensor cores")
    freeze_encoder: bool = key(False, help="train the decoder only: the latent space stays as it was (as "
                               "sd-vae-ft-mse was fine-tuned)")


@dataclass(frozen=True)
class EvalConfig:
    """How a run's model is looked at: the per-epoch picture grids and `imgvae evaluate`, which
    also runs after the last epoch."""

    grid_size: int = key(5, gt=0, le=64, help="side of the square picture grids written every epoch")
    after_training: bool = key(True, help="after the last epoch, evaluate the final weights on data.eval "
                               "(metrics.json)")
    iw_samples: int = key(8, ge=1, le=10**4, help="samples of the importance-weighted likelihood bound")
    batch_size: int = key(0, ge=0, le=2**16, help="images per batch (0 = train.batch_size)")
    limit: int = key(0, ge=0, le=10**12, help="only the first N held-out images (0 = all)")
    seed: int | None = key(None, ge=0, le=2**31 - 1, help="seed of the evaluation's noise (null = train.seed)")
    fid_weights: str | None = key(None, help="torch-fidelity's InceptionV3 weights file: adds real FID (never "
                                  "downloaded)")
    lpips_weights: str | None = key(None, help="torchvision's AlexNet (or VGG16) ImageNet weights file: adds LPIPS "
                                    "(never downloaded)")
    sample_reference: list[str] = key(factory=list, help="score samples against these sources instead of the "
                                      "held-out images ([] = the held-out images)")
    generation_images: int = key(256, ge=0, le=10**5, help="each prior's samples scored against this many training "
                                 "views: fd_effnet, precision / recall, memorised share, the reconstruction floor "
                                 "(0 = off)")
