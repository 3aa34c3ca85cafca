"""A Gaussian fitted to the aggregate posterior, to sample from instead of N(0, I).

A VAE whose decoder is sharp (learned sigma, spatial latents) pays little KL, and its
latents drift far from N(0, I): decoding prior noise then gives texture, not scenes.
Fitting a density to the latents of the training images after training ("ex-post
density estimation", Ghosh et al. 2020, the two-stage idea of Dai & Wipf 2019) and
sampling from it fixes much of that. Here the density is one full-covariance
Gaussian with the aggregate posterior's exact first two moments:
mean E_x[mu(x)], covariance Cov_x[mu(x)] + E_x[diag sigma^2(x)].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import CheckpointError, load_model, resolve_checkpoint
from .config import ConfigError
from .data import build_dataset, collate, normalize
from .models import VAE
from .runtime import pick_device
from .sample import inference
from .sources import SourceError

PRIOR_FILE = "prior.safetensors"
MAX_DIMS = 8192  # a D x D float64 covariance: 512 MiB at this size


@dataclass
class LatentPrior:
    """N(mean, L L^T) over the flattened latent; `images`: how many it was fitted on."""

    mean: torch.Tensor  # (D,)
    scale_tril: torch.Tensor  # (D, D), lower triangular
    images: int

    def transform(self, noise: torch.Tensor) -> torch.Tensor:
        """Standard normal noise (n, *latent_shape) -> latents from this prior, same shape;
        noise scaled by T gives temperature T around the mean."""
        flat = noise.flatten(1).to(self.scale_tril)
        if flat.shape[1] != len(self.mean):
            raise CheckpointError(f"the fitted prior is over {len(self.mean)} latent dimensions, this model has "
                                  f"{flat.shape[1]}: fit it again with `imgvae fit-prior`")
        return (self.mean.to(flat) + flat @ self.scale_tril.T).view_as(noise).to(noise.dtype)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".tmp-{path.name}")
        save_file({"mean": self.mean.contiguous(), "scale_tril": self.scale_tril.contiguous()}, str(tmp),
                  metadata={"images": str(self.images)})
        os.replace(tmp, path)  # a crash leaves the old prior or none, never half a file

    @classmethod
    def load(cls, path: Path) -> LatentPrior:
        try:
            with safe_open(str(path), "pt") as f:
                images = int((f.metadata() or {}).get("images", 0))
                return cls(f.get_tensor("mean"), f.get_tensor("scale_tril"), images)
        except Exception as e:  # truncated or foreign file
            raise CheckpointError(f"{path}: not a readable fitted prior ({type(e).__name__}: {e})") from None


def load_prior(checkpoint: str | Path) -> LatentPrior | None:
    """The checkpoint's fitted prior, or None if it has none."""
    path = resolve_checkpoint(checkpoint) / PRIOR_FILE
    return LatentPrior.load(path) if path.is_file() else None


def fit_prior(model: VAE, dataset, *, limit: int = 10_000, batch_size: int = 64, progress: bool = True) -> LatentPrior:
    """Fit the Gaussian to the posteriors of `limit` images spread evenly over
    `dataset` (all when limit is 0 or larger than it)."""
    if limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    dims = int(torch.Size(model.latent_shape).numel())
    if dims > MAX_DIMS:
        raise ConfigError(f"a full-covariance prior over {dims} latent dimensions is too large (at most {MAX_DIMS}): "
                          "use a smaller image size or fewer latent channels")
    count = min(limit, len(dataset)) if limit else len(dataset)
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         collate_fn=collate)
    n = 0
    mean_sum, var_sum = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dtype=torch.float64)
    outer_sum = torch.zeros(dims, dims, dtype=torch.float64)
    with inference(model) as device:
        for images, _, _ in tqdm(loader, desc="fit prior", disable=not progress, dynamic_ncols=True):
            if len(images) == 0:
                continue
            posterior = model.encode(normalize(images.to(device)))
            mu = posterior.mean.flatten(1).double().cpu()
            mean_sum += mu.sum(0)
            outer_sum += mu.T @ mu
            var_sum += posterior.logvar.exp().flatten(1).double().sum(0).cpu()
            n += len(images)
    if n < 2:
        raise SourceError("fitting a prior needs at least 2 readable images")
    mean = mean_sum / n
    cov = (outer_sum - n * torch.outer(mean, mean)) / (n - 1) + torch.diag(var_sum / n)
    # Fewer images than dimensions leaves the covariance singular: a small ridge keeps it positive definite.
    cov += 1e-6 * cov.diagonal().mean() * torch.eye(dims, dtype=torch.float64)
    return LatentPrior(mean.float(), torch.linalg.cholesky(cov).float(), n)


def fit_checkpoint_prior(checkpoint: str | Path, sources: list[str] | None = None, *, limit: int = 10_000,
                         batch_size: int = 64, device: str = "auto", progress: bool = True) -> tuple[LatentPrior, Path]:
    """Fit a prior for a checkpoint (its EMA weights when it has them) on `sources`
    (default: its config's data.train, with the training crops of epoch 1, no flips) and
    write CKPT/prior.safetensors, which `sample` and `evaluate` then use."""
    model, cfg = load_model(checkpoint, pick_device(device))
    dataset = build_dataset(sources or cfg.data.train, cfg.data, train=True, seed=cfg.train.seed)
    prior = fit_prior(model, dataset, limit=limit, batch_size=batch_size, progress=progress)
    path = resolve_checkpoint(checkpoint) / PRIOR_FILE
    prior.save(path)
    return prior, path
