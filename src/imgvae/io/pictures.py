"""Picture files: grids of [0, 1] images, and labelled rows of them, as PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid, save_image


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """[0, 1] images (n, 3, S, S) -> one (3, H, W) grid image; values that are not finite (a diverging
    model's) are drawn black, and the rest clamped to [0, 1]."""
    images = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images: torch.Tensor, nrow: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid(images, nrow), path)


def save_labelled_rows(rows: list[tuple[str, torch.Tensor]], path: Path, label_width: int = 230) -> None:
    """One PNG: a label column, then each row's [0, 1] images (n, 3, S, S) side by side."""
    strips = [make_grid(images, nrow=len(images), padding=2, pad_value=1.0) for _, images in rows]
    h, w = strips[0].shape[1], max(strip.shape[2] for strip in strips)
    canvas = Image.new("RGB", (label_width + w, h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((label, _), strip) in enumerate(zip(rows, strips)):
        canvas.paste(Image.fromarray(strip.mul(255).round().byte().permute(1, 2, 0).numpy()), (label_width, i * h))
        draw.text((6, i * h + h // 2 - 6), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
