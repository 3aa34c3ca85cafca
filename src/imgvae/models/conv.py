"""imgvae's own convolutional VAEs: the seed's (flat latent), a residual one (flat latent)
and latent-diffusion's KL autoencoders kl-f4 / kl-f8 (spatial latent)."""

from __future__ import annotations

import torch
from torch import nn

from imgvae.config import ConfigError, ModelConfig
from imgvae.models.base import VAE, DiagonalGaussian, register


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
