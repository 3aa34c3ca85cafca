"""Encoded image bytes -> the seed's preprocessed uint8 view, and uint8 batches -> model input.

Workers return uint8 tensors (4x less to move than float); random flip and
normalisation run on whole batches in `to_model_input`, on the training device.
"""

from __future__ import annotations

import io
import random
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import DataConfig

MEAN = STD = 0.5  # the seed's normalisation: [0, 1] -> [-1, 1]
EXIF_ORIENTATION = 0x0112


class UnusableFile(ValueError):
    """A file that is skipped by design: too large, too many pixels."""


_OBJECT_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def skip_reason(error: Exception) -> str:
    """Why a file was skipped, in one line: no memory addresses, no traceback."""
    if isinstance(error, UnusableFile):
        return str(error)
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image (PIL cannot identify its format)"
    if isinstance(error, OSError) and error.strerror:  # missing, unreadable, a link loop ...
        return error.strerror
    text = " ".join(_OBJECT_ADDRESS.sub("", str(error)).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def open_image(data: bytes, cfg: DataConfig) -> Image.Image:
    """Encoded bytes -> an unloaded PIL image (only the header read), refused when it has
    more than data.max_megapixels pixels."""
    with warnings.catch_warnings():  # PIL warns above its soft limit; data.max_megapixels decides here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    megapixels = img.width * img.height / 1e6
    if megapixels > cfg.max_megapixels:
        raise UnusableFile(f"too many pixels: {img.width}x{img.height} = {megapixels:,.1f} MP "
                           f"(data.max_megapixels is {cfg.max_megapixels:g})")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Decoded image in any mode -> 8-bit RGB.

    Grey and palette images are replicated / expanded to 3 channels, alpha is
    dropped, CMYK is converted, 16-bit grey is scaled to 8 bits (PIL's own
    conversion would clip it instead).
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            arr = arr / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def crop_box(width: int, height: int, cfg: DataConfig, rng: random.Random | None) -> tuple[int, int, int]:
    """(left, top, side) of the square to crop.

    "center": side = min(crop_size, shorter side), placed as torchvision's
    CenterCrop places it; we never zero-pad small images as the seed did.
    "random": side = U(crop_scale) * shorter side at a uniform position.
    """
    short = min(width, height)
    if cfg.crop == "center" or rng is None:
        side = min(cfg.crop_size, short)
        return int(round((width - side) / 2.0)), int(round((height - side) / 2.0)), side
    lo, hi = cfg.crop_scale
    side = max(1, min(short, int(round(rng.uniform(lo, hi) * short))))
    return rng.randint(0, width - side), rng.randint(0, height - side), side


def crop_resize(img: Image.Image, left: int, top: int, side: int, size: int, fx: float = 1.0,
                fy: float = 1.0) -> np.ndarray:
    """Crop the square (in original pixels) and bilinear-resize it (PIL, antialiased) to
    size -> uint8 (3, size, size). fx, fy: how much smaller the decoded image is than the
    original (DCT scaling)."""
    if fx == fy == 1.0:  # the seed's order: integer crop, then resize
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    else:
        box = (left / fx, top / fy, (left + side) / fx, (top + side) / fy)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def load_view(data: bytes, cfg: DataConfig, rng: random.Random | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 (3, S, S) view.

    exact_decode: full decode + crop + resize, bit-identical to the seed's pipeline.
    Otherwise JPEGs are decoded at a reduced scale (libjpeg DCT scaling, 1/2 to
    1/8) that still leaves >= image_size pixels across the crop, and the crop is
    resized from there (faster; bench/RESULTS.md measures speed and difference).
    Other formats take the exact path either way.
    """
    if not data:
        raise UnusableFile("an empty file")
    with warnings.catch_warnings():  # PIL's notes on odd files (EXIF, palettes): a file decodes or is skipped
        warnings.simplefilter("ignore")
        img = open_image(data, cfg)
        width, height = img.size
        orientation = img.getexif().get(EXIF_ORIENTATION, 1) if cfg.exif_transpose else 1
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 90-degree turns swap
        left, top, side = crop_box(*upright, cfg, rng)
        scale = 1 if cfg.exact_decode else next((s for s in (8, 4, 2) if side / s >= cfg.image_size), 1)
        if scale > 1:
            # Ask for ceil(size / scale) so libjpeg never reduces more than `scale`.
            img.draft(None, (-(-width // scale), -(-height // scale)))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    return crop_resize(img, left, top, side, cfg.image_size, upright[0] / img.width, upright[1] / img.height)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], as ToTensor + Normalize(.5, .5)."""
    return (images.float().div(255) - MEAN) / STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Model scale [-1, 1] -> [0, 1] pixels, clamped."""
    return (x * STD + MEAN).clamp(0, 1)


def to_model_input(images: torch.Tensor, device: torch.device, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch -> normalised float batch on device; images where the bool mask
    flips (B,) is true are mirrored left-right (training)."""
    x = normalize(images.to(device, non_blocking=True))
    if flips is not None:
        x = torch.where(flips.to(device)[:, None, None, None], x.flip(-1), x)
    return x
