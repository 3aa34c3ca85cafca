"""VAE architectures behind a small registry.

Every model maps images (B, 3, S, S) in [-1, 1] to a posterior over latents
and back. No optimiser, device, precision or logging code lives here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .config import Config, ConfigError, LossConfig, ModelConfig

MODELS: dict[str, Callable[[ModelConfig, int, str], "VAE"]] = {}
# What the decoder says about pixel noise besides its mean: nothing ("none": the loss
# fixes it), one learned log-scale ("scalar"), or a log-scale per subpixel ("pixel",
# 3 more output channels).
SCALES = ("none", "scalar", "pixel")
# Learned log-scales are clamped: below -7 one 8-bit bin holds all the mass (PixelCNN++'s bound).
LOG_SCALE_RANGE = (-7.0, 3.0)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def register(name: str):
    def add(cls):
        MODELS[name] = cls
        return cls

    return add


def build_model(cfg: ModelConfig, image_size: int, scale: str = "none") -> "VAE":
    """The registered model cfg.name for square images of image_size; scale: see SCALES."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; available: {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, image_size, scale)


def decoder_scale(cfg: LossConfig) -> str:
    """The decoder output (SCALES) that the loss's likelihood needs."""
    if cfg.likelihood == "logistic":
        return "pixel"
    if cfg.likelihood == "gaussian":
        return {"fixed": "none", "scalar": "scalar", "pixel": "pixel"}[cfg.sigma]
    return "none"


def build_vae(cfg: Config) -> "VAE":
    """The model a run config describes: its architecture, image size and the decoder
    output its loss needs."""
    return build_model(cfg.model, cfg.data.image_size, decoder_scale(cfg.loss))


def check_model(cfg: Config) -> tuple[int, ...]:
    """Refuse a model the config cannot build (an unknown name, an image size its
    downsampling does not divide) before any data is read -> its latent shape. The model
    is built on the meta device: no memory, no weights."""
    with torch.device("meta"):
        return build_vae(cfg).latent_shape


@contextmanager
def inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode (BatchNorm running stats, no autograd) -> the model's device; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per element, in float64."""
    return -0.5 * z.double().pow(2) - LOG_SQRT_2PI


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); tensors of shape (B, *latent_shape)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + sigma * eps (reparametrisation: differentiable in mu, sigma);
        eps ~ N(0, I) drawn here unless given (same shape as mean)."""
        eps = torch.randn_like(self.mean) if noise is None else noise.to(self.mean)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent element, same shape as mean."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) per element, in float64 (the squared standardised distance in z's dtype)."""
        distance = ((z - self.mean).pow(2) / self.logvar.exp()).double()
        return -0.5 * distance - 0.5 * self.logvar.double() - LOG_SQRT_2PI


@dataclass
class VAEOutput:
    x_hat: torch.Tensor  # (B, 3, S, S) decoder mean on the [-1, 1] scale
    posterior: DiagonalGaussian
    z: torch.Tensor  # the latent that was decoded
    log_scale: torch.Tensor | None = None  # (B, 3, S, S) decoder log-scale, if the model has one

    def float(self) -> "VAEOutput":
        """fp32 copy of every field, for a loss computed outside autocast."""
        posterior = DiagonalGaussian(self.posterior.mean.float(), self.posterior.logvar.float())
        log_scale = None if self.log_scale is None else self.log_scale.float()
        return VAEOutput(self.x_hat.float(), posterior, self.z.float(), log_scale)


class VAE(nn.Module):
    """Interface shared by all registered models: subclasses define `encode` and
    `decoder_output` (B, out_channels, S, S), out_channels = 6 with scale "pixel"."""

    latent_shape: tuple[int, ...]

    def __init__(self, scale: str = "none"):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unknown decoder scale {scale!r}; available: {list(SCALES)}")
        self.scale = scale
        self.out_channels = 6 if scale == "pixel" else 3
        # sigma-VAE's single learned noise level: the optimiser tunes it with the weights.
        self.log_scale = nn.Parameter(torch.zeros(())) if scale == "scalar" else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        raise NotImplementedError

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_distribution(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents -> (decoder mean (B, 3, S, S), log-scale (B, 3, S, S) clamped to
        LOG_SCALE_RANGE, or None when the decoder has no scale)."""
        h = self.decoder_output(z)
        mean = h[:, :3]
        if self.scale == "pixel":
            return mean, h[:, 3:].clamp(*LOG_SCALE_RANGE)
        if self.scale == "scalar":
            return mean, self.log_scale.expand_as(mean).clamp(*LOG_SCALE_RANGE)
        return mean, None

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight (the adversarial loss balances its gradients)."""
        return self.decoder[-1].weight

    def encoder_modules(self) -> list[nn.Module]:
        """Everything between the image and the posterior (train.freeze_encoder holds them still)."""
        return [getattr(self, name) for name in ("encoder", "to_mean", "to_logvar", "to_stats") if hasattr(self, name)]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape) -> decoder mean (B, 3, S, S)."""
        return self.decode_distribution(z)[0]

    def forward(self, x: torch.Tensor, sample: bool = True, noise: torch.Tensor | None = None) -> VAEOutput:
        """sample=False decodes the posterior mean (deterministic reconstructions);
        noise: the eps of the reparametrisation, (B, *latent_shape), else drawn."""
        posterior = self.encode(x)
        z = posterior.sample(noise) if sample else posterior.mode()
        mean, log_scale = self.decode_distribution(z)
        return VAEOutput(mean, posterior, z, log_scale)


def _conv_bn_relu(cin: int, cout: int, momentum: float, transpose: bool = False) -> list[nn.Module]:
    if transpose:
        conv = nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1, bias=False)
    else:
        conv = nn.Conv2d(cin, cout, 5, stride=2, padding=2, bias=False)
    return [conv, nn.BatchNorm2d(cout, momentum=momentum), nn.ReLU(inplace=True)]


@register("seed")
class SeedVAE(VAE):
    """The original repository's VAE (../shared/seed/ARCHITECTURE.md), layer by layer.

    At 64x64 and latent 128: encoder 18,071,360 + decoder 4,693,155 parameters.
    The seed hard-wired 64x64; here the 8x8 bottleneck is image_size / 8.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, scale: str = "none"):
        super().__init__(scale)
        if image_size % 8:
            raise ConfigError(f"data.image_size: model 'seed' needs image_size divisible by 8, got {image_size}")
        m, d = cfg.bn_momentum, cfg.latent_dim
        self.bottleneck = (256, image_size // 8, image_size // 8)
        flat = 256 * (image_size // 8) ** 2
        self.latent_shape = (d,)
        self.encoder = nn.Sequential(
            *_conv_bn_relu(3, 64, m),
            *_conv_bn_relu(64, 128, m),
            *_conv_bn_relu(128, 256, m),
            nn.Flatten(),
            nn.Linear(flat, 1024, bias=False),
            nn.BatchNorm1d(1024, momentum=m),
            nn.ReLU(inplace=True),
        )
        self.to_mean = nn.Linear(1024, d)
        self.to_logvar = nn.Linear(1024, d)
        self.decoder_fc = nn.Sequential(
            nn.Linear(d, flat, bias=False), nn.BatchNorm1d(flat, momentum=m), nn.ReLU(inplace=True)
        )
        self.decoder = nn.Sequential(
            *_conv_bn_relu(256, 256, m, transpose=True),
            *_conv_bn_relu(256, 128, m, transpose=True),
            *_conv_bn_relu(128, 32, m, transpose=True),
            nn.Conv2d(32, self.out_channels, 5, stride=1, padding=2),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.encoder(x)  # (B, 1024)
        return DiagonalGaussian(self.to_mean(h), self.to_logvar(h))

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder(self.decoder_fc(z).view(z.shape[0], *self.bottleneck))
        return torch.cat([torch.tanh(h[:, :3]), h[:, 3:]], 1)  # the seed's tanh bounds the mean only


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected) skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            _group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _group_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


@register("resnet")
class ResNetVAE(VAE):
    """A flat latent like the seed's, with residual blocks, GroupNorm and SiLU.

    No BatchNorm: an image's output does not depend on its batch, so DDP and
    gradient accumulation give the same result as one large batch. Encoder:
    `levels` x (blocks, stride-2 conv), channels base * (1, 2, 4, 4, ...); a linear layer to
    (mean, logvar). Decoder mirrors it with nearest-neighbour upsampling + conv.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, scale: str = "none"):
        super().__init__(scale)
        if image_size % 2**cfg.levels:
            raise ConfigError(f"data.image_size: model 'resnet' needs image_size divisible by 2**levels = "
                              f"{2**cfg.levels}, got {image_size}")
        widths = [cfg.base_channels * 2 ** min(i, 2) for i in range(cfg.levels + 1)]
        side = image_size // 2**cfg.levels
        self.bottleneck = (widths[-1], side, side)
        self.latent_shape = (cfg.latent_dim,)
        down: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for cin, cout in zip(widths, widths[1:]):
            down += [ResBlock(cin, cin) for _ in range(cfg.blocks)]
            down.append(nn.Conv2d(cin, cout, 3, stride=2, padding=1))
        down += [ResBlock(widths[-1], widths[-1]), _group_norm(widths[-1]), nn.SiLU(), nn.Flatten()]
        self.encoder = nn.Sequential(*down)
        flat = widths[-1] * side * side
        self.to_stats = nn.Linear(flat, 2 * cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim, flat)
        up: list[nn.Module] = [ResBlock(widths[-1], widths[-1])]
        for cin, cout in zip(widths[::-1], widths[::-1][1:]):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1)]
            up += [ResBlock(cout, cout) for _ in range(cfg.blocks)]
        up += [_group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], self.out_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*up)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)  # (B, latent_dim) each
        return DiagonalGaussian(mean, logvar)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_latent(z).view(z.shape[0], *self.bottleneck))


class SelfAttention(nn.Module):
    """Single-head attention over the h*w positions of a feature map (LDM's mid block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, hw, C) each
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(1, 2).reshape(b, c, h, w))


class KLAutoencoder(VAE):
    """A spatial latent, as latent-diffusion's AutoencoderKL: z is (latent_channels,
    S / f, S / f) with f = 2**downsamplings; ResBlocks with GroupNorm + SiLU, an
    attention mid block, channels base * (1, 2, 4, 4). Any image_size divisible by f.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, scale: str, downsamplings: int):
        super().__init__(scale)
        factor = 2**downsamplings
        if image_size % factor:
            raise ConfigError(f"data.image_size: model 'kl-f{factor}' needs image_size divisible by {factor}, "
                              f"got {image_size}")
        widths = [cfg.base_channels * m for m in (1, 2, 4, 4, 4)[: downsamplings + 1]]
        side, c = image_size // factor, cfg.latent_channels
        self.latent_shape = (c, side, side)

        def mid(width):
            return [ResBlock(width, width), SelfAttention(width), ResBlock(width, width)]

        down: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for i, width in enumerate(widths):
            down += [ResBlock(widths[max(i - 1, 0)] if b == 0 else width, width) for b in range(cfg.blocks)]
            if i < downsamplings:
                down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        down += [*mid(widths[-1]), _group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 2 * c, 3, padding=1)]
        self.encoder = nn.Sequential(*down)
        up: list[nn.Module] = [nn.Conv2d(c, widths[-1], 3, padding=1), *mid(widths[-1])]
        for i, width in reversed(list(enumerate(widths))):
            up += [ResBlock(widths[min(i + 1, downsamplings)] if b == 0 else width, width) for b in range(cfg.blocks)]
            if i > 0:
                up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        up += [_group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], self.out_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*up)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, c, S/f, S/f) each
        # LDM's clamp: keeps exp(logvar) finite early in training.
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


register("kl-f4")(lambda cfg, image_size, scale="none": KLAutoencoder(cfg, image_size, scale, 2))
register("kl-f8")(lambda cfg, image_size, scale="none": KLAutoencoder(cfg, image_size, scale, 3))


def autoencoder_kl_arguments(cfg: ModelConfig, out_channels: int = 3) -> dict:
    """diffusers.AutoencoderKL's constructor arguments for an autoencoder-kl model config."""
    levels = len(cfg.block_out_channels)
    return {
        "in_channels": 3, "out_channels": out_channels, "block_out_channels": tuple(cfg.block_out_channels),
        "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        "layers_per_block": cfg.layers_per_block, "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups, "mid_block_add_attention": cfg.mid_block_add_attention,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
    }


@register("autoencoder-kl")
class AutoencoderKL(VAE):
    """A diffusers AutoencoderKL (`self.net`, what Stable Diffusion's VAEs are) behind imgvae's
    interface: its encoder's Gaussian, its decoder. The learned scalar sigma is imgvae's own
    (`log_scale`); a per-pixel sigma adds 3 output channels to the decoder, dropped on export.
    Any image size that 2**(levels - 1) divides."""

    def __init__(self, cfg: ModelConfig, image_size: int, scale: str = "none"):
        super().__init__(scale)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size % factor:
            raise ConfigError(f"data.image_size: model 'autoencoder-kl' with {len(cfg.block_out_channels)} levels "
                              f"needs image_size divisible by {factor}, got {image_size}")
        undivided = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
        if undivided:
            raise ConfigError(f"model.norm_num_groups: {cfg.norm_num_groups} groups do not divide the channels "
                              f"{undivided} of model.block_out_channels")
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # here: importing diffusers takes seconds

        self.net = DiffusersAutoencoderKL(**autoencoder_kl_arguments(cfg, self.out_channels), sample_size=image_size)
        self.latent_shape = (cfg.latent_channels, image_size // factor, image_size // factor)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        posterior = self.net.encode(x).latent_dist  # its log-variance is clamped to [-30, 20], as LDM's
        return DiagonalGaussian(posterior.mean, posterior.logvar)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z).sample

    def last_layer(self) -> torch.Tensor:
        return self.net.decoder.conv_out.weight

    def encoder_modules(self) -> list[nn.Module]:
        return [m for m in (self.net.encoder, self.net.quant_conv) if m is not None]


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (as in taming-transformers): (B, 3, S, S) -> (B, 1, ~S/8, ~S/8)
    real/fake logits, one per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            blocks += [nn.Conv2d(width, out, 4, stride=2 if i < layers else 1, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():  # pix2pix's N(0, 0.02) init
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
