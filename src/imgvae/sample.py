"""Decoding: prior samples, reconstructions, latent interpolations, picture grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid, save_image

from .config import ConfigError, DataConfig
from .datasets import load_image_file
from .decode import denormalize, normalize
from .models import VAE, inference
from .prior import LatentPrior


def prior_noise(model: VAE, n: int, seed: int, temperature: float = 1.0,
                prior: LatentPrior | None = None) -> torch.Tensor:
    """Fixed latents (n, *latent_shape) from N(0, T^2 I), or from a fitted prior at
    temperature T; drawn on the CPU so the same seed gives the same latents on any device."""
    generator = torch.Generator().manual_seed(seed)
    noise = temperature * torch.randn(n, *model.latent_shape, generator=generator)
    return noise if prior is None else prior.transform(noise, generator)


def decode(model: VAE, z: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (n, 3, S, S), on the CPU."""
    with inference(model) as device:
        return denormalize(model.decode(z.to(device)).float()).cpu()


def reconstruct(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Normalised images -> deterministic reconstructions (posterior mean) in [0, 1]."""
    with inference(model) as device:
        return denormalize(model(x.to(device), sample=False).x_hat.float()).cpu()


def sample(model: VAE, n: int, seed: int, temperature: float = 1.0, prior: LatentPrior | None = None) -> torch.Tensor:
    """n images from the prior (N(0, T^2 I), or a fitted one), [0, 1], (n, 3, S, S); same seed, same images."""
    if not temperature > 0:
        raise ConfigError(f"the temperature must be > 0, got {temperature}")
    return decode(model, prior_noise(model, n, seed, temperature, prior))


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents a, b (same shape) at fractions t (K,)
    -> (K, *a.shape); falls back to linear when a and b are (anti)parallel."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm()).clamp(min=1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    t = t.double().view(-1, *([1] * a.dim()))
    if torch.sin(omega).abs() < 1e-6:
        return lerp(a, b, t.flatten())
    out = (torch.sin((1 - t) * omega) * a.double() + torch.sin(t * omega) * b.double()) / torch.sin(omega)
    return out.to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation at fractions t (K,) -> (K, *a.shape)."""
    t = t.to(a.dtype).view(-1, *([1] * a.dim()))
    return (1 - t) * a + t * b


def interpolate(model: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Decode `steps` points from the posterior mean of x_a to that of x_b (normalised
    (3, S, S) images), linearly and spherically -> {"linear", "spherical"}: [0, 1] (steps, 3, S, S)."""
    with inference(model) as device:
        z = model.encode(torch.stack([x_a, x_b]).to(device)).mode().float().cpu()
    t = torch.linspace(0, 1, steps)
    return {"linear": decode(model, lerp(z[0], z[1], t)), "spherical": decode(model, slerp(z[0], z[1], t))}


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """[0, 1] images (n, 3, S, S) -> one (3, H, W) grid image."""
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


def reconstruct_files(model: VAE, cfg: DataConfig, paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Each image file, preprocessed as the eval split, next to its reconstruction:
    out_dir/<stem>_reconstruction.png (input | reconstruction), plus
    reconstructions.png with all pairs. Returns the written paths."""
    out = Path(out_dir)
    images = torch.stack([load_image_file(p, cfg) for p in paths])
    real = images.float() / 255
    recon = reconstruct(model, normalize(images))
    written = []
    for path, a, b in zip(paths, real, recon):
        target = out / f"{Path(path).stem}_reconstruction.png"
        save_grid(torch.stack([a, b]), 2, target)
        written.append(target)
    pairs = torch.stack([real, recon], 1).flatten(0, 1)
    save_grid(pairs, 2 * min(4, len(paths)), out / "reconstructions.png")
    return written + [out / "reconstructions.png"]


def sample_files(model: VAE, n: int, out_dir: str | Path, seed: int, temperature: float = 1.0,
                 prior: LatentPrior | None = None) -> list[Path]:
    """n prior samples: out_dir/sample_NNN.png each, and samples.png as one grid."""
    out = Path(out_dir)
    images = sample(model, n, seed, temperature, prior)
    written = []
    for i, image in enumerate(images):
        written.append(out / f"sample_{i:03d}.png")
        save_grid(image[None], 1, written[-1])
    save_grid(images, math.ceil(math.sqrt(n)), out / "samples.png")
    return written + [out / "samples.png"]


def interpolate_files(model: VAE, cfg: DataConfig, path_a: str | Path, path_b: str | Path, steps: int,
                      out_dir: str | Path) -> Path:
    """out_dir/interpolation.png: row 1 linear, row 2 spherical; each row is
    image A, `steps` decoded latents from A's to B's, image B."""
    if steps < 2:
        raise ValueError(f"--steps must be >= 2, got {steps}")
    a, b = load_image_file(path_a, cfg), load_image_file(path_b, cfg)
    paths = interpolate(model, normalize(a[None])[0], normalize(b[None])[0], steps)
    ends = a.float()[None] / 255, b.float()[None] / 255
    rows = [torch.cat([ends[0], paths[kind], ends[1]]) for kind in ("linear", "spherical")]
    target = Path(out_dir) / "interpolation.png"
    save_grid(torch.cat(rows), steps + 2, target)
    return target
