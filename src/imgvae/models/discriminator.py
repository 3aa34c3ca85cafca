"""The PatchGAN discriminator of the adversarial loss."""

from __future__ import annotations

import torch
from torch import nn


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
