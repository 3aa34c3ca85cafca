"""Encoded image bytes -> the seed's preprocessed uint8 view, and uint8 batches -> model input.

Workers return uint8 tensors (4x less to move than float); random flip and
normalisation run on whole batches in `to_model_input`, on the training device.
"""

from __future__ import annotations

import io
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from imgvae.config import DataConfig, center_crop_size

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

    "center": side = min(crop_size, shorter side) (center_crop_size), placed as torchvision's
    CenterCrop places it; we never zero-pad small images as the seed did.
    "random": side = U(crop_scale) * shorter side at a uniform position.
    """
    short = min(width, height)
    if cfg.crop == "center" or rng is None:
        side = min(center_crop_size(cfg), short)
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


@dataclass(frozen=True)
class Header:
    """What a view's plan needs of an image, from its header alone."""

    width: int
    height: int
    orientation: int  # EXIF orientation honoured (1 when data.exif_transpose is off)
    jpeg: bool  # decodable at reduced scale (libjpeg DCT scaling)

    @property
    def upright(self) -> tuple[int, int]:
        """(width, height) once turned upright: 90-degree turns swap them."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def read_header(img: Image.Image, cfg: DataConfig) -> Header:
    orientation = img.getexif().get(EXIF_ORIENTATION, 1) if cfg.exif_transpose else 1
    return Header(img.width, img.height, orientation, img.format == "JPEG")


def plan_view(header: Header, cfg: DataConfig, rng: random.Random | None) -> tuple[tuple[int, int, int], int]:
    """-> (the crop's (left, top, side) in the upright image, the JPEG reduction to decode at)."""
    box = crop_box(*header.upright, cfg, rng)
    reducible = header.jpeg and not cfg.exact_decode
    return box, next((s for s in (8, 4, 2) if box[2] / s >= cfg.image_size), 1) if reducible else 1


def decode_at(img: Image.Image, header: Header, scale: int) -> Image.Image:
    """An opened image decoded at 1/scale (JPEG), turned upright, as 8-bit RGB."""
    if scale > 1:
        # Ask for ceil(size / scale) so libjpeg never reduces more than `scale`.
        img.draft(None, (-(-header.width // scale), -(-header.height // scale)))
    img.load()
    if header.orientation != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def cut_view(img: Image.Image, header: Header, box: tuple[int, int, int], cfg: DataConfig) -> np.ndarray:
    """The crop `box` (upright, original pixels) of a decoded image, resized -> uint8 (3, S, S)."""
    width, height = header.upright
    return crop_resize(img, *box, cfg.image_size, width / img.width, height / img.height)


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
        header = read_header(img, cfg)
        box, scale = plan_view(header, cfg, rng)
        return cut_view(decode_at(img, header, scale), header, box, cfg)


def device_decodable(data: bytes, cfg: DataConfig) -> bool:
    """Whether device_views takes this file as the PIL path would: a complete JPEG (ending in
    its EOI marker: a decoder may fill a truncated one with grey where PIL refuses it), RGB or
    grey (not CMYK), within data.max_megapixels, upright (no EXIF turn to apply)."""
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(data, cfg)
            header = read_header(img, cfg)
    except Exception:  # the CPU path says why
        return False
    return header.jpeg and img.mode in ("RGB", "L") and header.orientation == 1


def device_views(encoded: list[bytes], cfg: DataConfig, device: torch.device) -> list[np.ndarray | None]:
    """JPEG files (device_decodable) -> their centre-crop views, decoded on `device` in one batch
    (torchvision's decode_jpeg: nvJPEG on CUDA), cropped and resized there (bilinear, antialiased
    as PIL's resize is); None where the decoder refused a file."""
    if not encoded:
        return []
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        try:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole batch: decode them one by one
            images = [_decode_one(t, device) for t in tensors]
    views = [None if img is None else _centre_view(img, cfg) for img in images]
    decoded = [v for v in views if v is not None]
    back = iter(torch.stack(decoded).cpu().numpy() if decoded else [])  # one copy for the batch
    return [None if v is None else next(back) for v in views]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _centre_view(image: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (3, H, W) -> the centre crop resized to uint8 (3, S, S), on the image's device."""
    left, top, side = crop_box(image.shape[2], image.shape[1], cfg, None)
    crop = image[None, :, top:top + side, left:left + side].float()
    view = F.interpolate(crop, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True,
                         align_corners=False)
    return view[0].round_().clamp_(0, 255).to(torch.uint8)


class DecodedImages:
    """Whole images kept decoded in RAM (per JPEG reduction), up to `budget` bytes: random crops
    of a few large photos then cut every view from one decode, pixel for pixel the view that
    load_view would decode afresh."""

    def __init__(self, budget: float):
        self.budget, self.used = budget, 0
        self.headers: dict[int, Header] = {}
        self.images: dict[tuple[int, int], Image.Image] = {}

    def view(self, file: int, read, cfg: DataConfig, rng: random.Random | None) -> np.ndarray:
        """File `file`'s view; read() gives its bytes when they must be decoded."""
        header = self.headers.get(file)
        if header is None:
            return self._decode(file, read(), cfg, rng)
        box, scale = plan_view(header, cfg, rng)
        img = self.images.get((file, scale))
        if img is None:
            return self._decode(file, read(), cfg, rng, (box, scale))
        return cut_view(img, header, box, cfg)

    def _decode(self, file: int, data: bytes, cfg: DataConfig, rng, plan=None) -> np.ndarray:
        if not data:
            raise UnusableFile("an empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(data, cfg)
            header = read_header(img, cfg)
            box, scale = plan or plan_view(header, cfg, rng)
            decoded = decode_at(img, header, scale)
        size = decoded.width * decoded.height * 3
        if self.used + size <= self.budget:
            self.headers[file], self.images[file, scale] = header, decoded
            self.used += size
        return cut_view(decoded, header, box, cfg)


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
