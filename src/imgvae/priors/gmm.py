"""A Gaussian mixture fitted to the aggregate posterior, to sample from instead of N(0, I).

A VAE whose decoder is sharp (learned sigma, spatial latents) pays little KL, and its latents
drift far from N(0, I): decoding prior noise then gives texture, not scenes. Fitting a density to
the latents of the training images after training ("ex-post density estimation", Ghosh et al.
2020, the two-stage idea of Dai & Wipf 2019) and sampling from it fixes much of that. With one
component the density is the Gaussian with the aggregate posterior's exact first two moments:
mean E_x[mu(x)], covariance Cov_x[mu(x)] + E_x[diag sigma^2(x)]. With K > 1 it is scikit-learn's
full-covariance Gaussian mixture over the posterior means, each covariance plus E_x[diag
sigma^2(x)]: it keeps apart the modes (scenes) that one Gaussian would blend. It lives in the
checkpoint folder as prior.safetensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from imgvae.config import ConfigError, GMMConfig
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import normalize
from imgvae.data.loading import eval_loader
from imgvae.data.sources import SourceError
from imgvae.io.checkpoint import one_line, save_weights
from imgvae.io.paths import identify, open_for, open_model, provenance_of
from imgvae.io.pictures import save_grid
from imgvae.models.base import VAE, inference
from imgvae.models.generate import decode
from imgvae.priors.registry import PriorKind, SampleOptions, refuse, register
from imgvae.rundir import GRIDS, CheckpointError, prior_grid

PRIOR_FILE = "prior.safetensors"
MAX_DIMS = 8192  # a D x D float64 covariance per component: 512 MiB at this size


@dataclass
class LatentPrior:
    """A mixture of K Gaussians N(mean_k, L_k L_k^T) with weights w_k over the flattened
    latent (K = 1: one Gaussian); `images`: how many it was fitted on."""

    weights: torch.Tensor  # (K,)
    mean: torch.Tensor  # (K, D)
    scale_tril: torch.Tensor  # (K, D, D), lower triangular
    images: int

    def describe(self) -> str:
        kind = "a Gaussian" if len(self.weights) == 1 else f"a mixture of {len(self.weights)} Gaussians"
        return f"{kind} over {self.mean.shape[1]} latent dimensions, fitted on {self.images} training images"

    def transform(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise (n, *latent_shape) -> latents from this prior, same shape,
        each from a component drawn with `generator`; noise scaled by T gives temperature T
        around the component means."""
        flat = noise.flatten(1).to(self.scale_tril)
        if flat.shape[1] != self.mean.shape[1]:
            raise CheckpointError(f"the fitted prior is over {self.mean.shape[1]} latent dimensions, this model has "
                                  f"{flat.shape[1]}: fit it again with `imgvae fit-prior`")
        components = (torch.zeros(len(flat), dtype=torch.long) if len(self.weights) == 1
                      else torch.multinomial(self.weights, len(flat), replacement=True, generator=generator))
        z = torch.empty_like(flat)
        for k in components.unique().tolist():
            chosen = components == k
            z[chosen] = self.mean[k].to(flat) + flat[chosen] @ self.scale_tril[k].T
        return z.view_as(noise).to(noise.dtype)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".tmp-{path.name}")
        tensors = {"weights": self.weights, "mean": self.mean, "scale_tril": self.scale_tril}
        try:
            save_weights(tensors, tmp, metadata={"images": str(self.images)})
            os.replace(tmp, path)  # a crash leaves the old prior or none, never half a file
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> LatentPrior:
        try:
            with safe_open(str(path), "pt") as f:
                images = int((f.metadata() or {}).get("images", 0))
                mean, scale_tril = f.get_tensor("mean"), f.get_tensor("scale_tril")
                if mean.dim() == 1:  # a single Gaussian, as written before mixtures
                    return cls(torch.ones(1), mean[None], scale_tril[None], images)
                return cls(f.get_tensor("weights"), mean, scale_tril, images)
        except Exception as e:  # truncated or foreign file
            raise CheckpointError(f"{path}: not a readable fitted prior ({one_line(e)})") from None


def check_size(components: int, dims: int) -> None:
    """Refuse a prior whose covariances would not fit in memory."""
    if components * dims**2 > MAX_DIMS**2:
        raise ConfigError(f"prior.components: {components} full-covariance Gaussians over {dims} latent dimensions "
                          f"are too large (at most {MAX_DIMS}^2 covariance entries): use fewer components, a smaller "
                          "image size or fewer latent channels")


def _posteriors(model: VAE, dataset, indices: list[int], batch_size: int, progress: bool):
    """The posterior means (n, D) of the images at `indices` and the sum of their variances (D,), float64."""
    dims = int(torch.Size(model.latent_shape).numel())
    means, var_sum = [], torch.zeros(dims, dtype=torch.float64)
    with inference(model) as device:
        loader = eval_loader(dataset, batch_size, device, indices=indices)
        for images, _, _ in tqdm(loader, desc="fit prior", disable=not progress, dynamic_ncols=True):
            if len(images) == 0:
                continue
            posterior = model.encode(normalize(images.to(device)))
            means.append(posterior.mean.flatten(1).float().cpu())
            var_sum += posterior.logvar.exp().flatten(1).double().sum(0).cpu()
    return (torch.cat(means).double() if means else torch.zeros(0, dims, dtype=torch.float64)), var_sum


def fit_prior(model: VAE, dataset, *, limit: int = 10_000, components: int = 1, batch_size: int = 64,
              seed: int = 0, progress: bool = True) -> LatentPrior:
    """Fit the prior (K = `components`) to the posteriors of `limit` images spread evenly
    over `dataset` (all when limit is 0 or larger than it)."""
    if limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    if components < 1:
        raise ConfigError(f"components must be >= 1, got {components}")
    dims = int(torch.Size(model.latent_shape).numel())
    check_size(components, dims)
    count = min(limit, len(dataset)) if limit else len(dataset)
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    mu, var_sum = _posteriors(model, dataset, indices, batch_size, progress)
    n = len(mu)
    if n < max(2, components):
        raise SourceError(f"fitting a prior of {components} components needs at least {max(2, components)} "
                          "readable images")
    if components == 1:
        weights, mean = torch.ones(1, dtype=torch.float64), mu.mean(0)[None]
        cov = torch.cov(mu.T).reshape(1, dims, dims)
    else:
        from sklearn.mixture import GaussianMixture  # imported here: only mixtures need it

        # The ridge is relative to the latents' scale: a component fitted on fewer images than dimensions is singular.
        mixture = GaussianMixture(components, covariance_type="full", reg_covar=1e-3 * float(mu.var(0).mean()),
                                  random_state=seed).fit(mu.numpy())
        weights, mean, cov = (torch.from_numpy(a) for a in (mixture.weights_, mixture.means_, mixture.covariances_))
    cov = cov + torch.diag(var_sum / n)
    # Fewer images than dimensions leaves a covariance singular: a small ridge keeps it positive definite.
    cov += 1e-6 * cov.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(dims, dtype=torch.float64)
    if not torch.isfinite(cov).all():
        raise CheckpointError("the model's latents are not finite (diverged weights?): no prior can be fitted to them")
    return LatentPrior(weights.float(), mean.float(), torch.linalg.cholesky(cov).float(), n)


def load_prior(path: str | Path) -> LatentPrior | None:
    """The fitted prior of a model path or folder (in its checkpoint or model folder), or None if it has none."""
    try:
        folder = identify(path).folder
    except CheckpointError:
        folder = Path(path)
    file = folder / PRIOR_FILE
    return LatentPrior.load(file) if file.is_file() else None


def fitted_prior_of(model) -> LatentPrior | None:
    """The fitted prior kept beside the weights an opened model was read from, if any."""
    where = provenance_of(model)
    file = None if where is None else where.folder / PRIOR_FILE
    return LatentPrior.load(file) if file is not None and file.is_file() else None


def latents(model: VAE, n: int, seed: int, prior: LatentPrior, temperature: float = 1.0) -> torch.Tensor:
    """n latents (n, *latent_shape) from a fitted prior at temperature T: the standard prior's noise
    for this seed (models.generate.prior_noise), carried through the prior, each from a component
    drawn after the noise with the same generator; drawn on the CPU (the same on any device)."""
    generator = torch.Generator().manual_seed(seed)
    noise = temperature * torch.randn(n, *model.latent_shape, generator=generator)
    return prior.transform(noise, generator)


def sample(model: VAE, n: int, seed: int, prior: LatentPrior, temperature: float = 1.0) -> torch.Tensor:
    """n images from a fitted prior at temperature T, [0, 1] (n, 3, S, S); same seed, same images."""
    return decode(model, latents(model, n, seed, prior, temperature))


def fit_checkpoint_prior(checkpoint: str | Path, sources: list[str] | None = None,
                         overrides: list[str] | dict | None = None, *,
                         device: str = "auto", progress: bool = True) -> tuple[LatentPrior, Path]:
    """Fit a prior for a model (its EMA weights when it has them) on `sources` (one centre view
    each; default: its config's data.train, with the training crops of epoch 1, no flips), as its
    config's gmm prior section says (prior.images, prior.components; overrides such as
    "prior.components=10" change them), and write CKPT/prior.safetensors, which `sample` and
    `evaluate` then use."""
    model, cfg, folder = open_for(checkpoint, sources, overrides, device, prior_kind="gmm")
    refuse("gmm", model.discrete, "fit-prior")
    dataset = build_dataset(sources or cfg.data.train, cfg.data, train=True, seed=cfg.train.seed)
    prior = fit_prior(model, dataset, limit=cfg.prior.images, components=cfg.prior.components,
                      batch_size=cfg.eval_batch_size, seed=cfg.train.seed, progress=progress)
    path = folder / PRIOR_FILE
    prior.save(path)
    return prior, path


class GaussianMixturePrior(PriorKind):
    name, preference = "gmm", 1

    def check(self, cfg, model) -> None:
        super().check(cfg, model)
        check_size(cfg.prior.components, math.prod(model.latent_shape))

    def make(self, checkpoint: Path, *, device: str, progress: bool) -> str:
        prior, path = fit_checkpoint_prior(checkpoint, device=device, progress=progress)
        model, cfg, _ = open_model(checkpoint, device)
        grid = provenance_of(model).home / GRIDS / prior_grid(GMMConfig.title)
        save_grid(sample(model, cfg.eval.grid_size**2, cfg.train.seed, prior), cfg.eval.grid_size, grid)
        return f"fitted {prior.describe()} ({path}); its samples: {grid}"

    def has(self, model, prior_run=None) -> bool:
        return fitted_prior_of(model) is not None

    def sampler(self, model, options: SampleOptions):
        prior = fitted_prior_of(model)
        if prior is None:
            where = provenance_of(model)
            path = where.path if where is not None else "this model"
            raise CheckpointError(f"{path} has no fitted prior: run `imgvae fit-prior {path}` first")
        return lambda n, seed: sample(model, n, seed, prior, options.temperature)


register(GaussianMixturePrior())
