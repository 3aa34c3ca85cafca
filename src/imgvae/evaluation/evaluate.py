"""Evaluate a trained VAE on a held-out set: reconstruction quality, likelihood
(ELBO and an importance-weighted bound, in nats and bits/dim), latent health
(KL per dimension, active units) and Fréchet distances in a feature space."""

from __future__ import annotations

import math
import warnings

import torch
from tqdm import tqdm

from imgvae.config import Config
from imgvae.data.datasets import BadFiles, ImageDataset, build_dataset, preprocessing
from imgvae.data.decode import denormalize, normalize
from imgvae.data.loading import eval_loader, loader_workers
from imgvae.data.sources import SourceError
from imgvae.errors import ImgvaeWarning
from imgvae.evaluation.results import Codebook, Distribution, Latent, Likelihood, Metrics, Reconstruction, Spread
from imgvae.metrics.distances import FeatureSet, frechet_distance, kernel_distance
from imgvae.metrics.features import LPIPS, feature_networks
from imgvae.models.base import VAE, Quantized
from imgvae.models.generate import prior_noise
from imgvae.models.losses import LIKELIHOOD_FAMILY, bits_per_dim, discretized_log_likelihood
from imgvae.models.quantized import code_usage
from imgvae.priors.gmm import LatentPrior, latents

ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): unit u is active if Cov_x(E[z_u | x]) > 0.01
MS_SSIM_MIN_SIZE = 161  # 5 scales of an 11-px kernel


def image_metrics(real: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR, SSIM (and MS-SSIM when the size allows) of [0, 1] images (B, 3, S, S)."""
    from torchmetrics.functional.image import (  # imported here: torchmetrics brings scipy, seconds to import
        multiscale_structural_similarity_index_measure,
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    metrics = {
        "mse": (real - recon).pow(2).flatten(1).mean(1),
        "psnr": peak_signal_noise_ratio(recon, real, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(recon, real, data_range=1.0, reduction="none"),
    }
    if real.shape[-1] >= MS_SSIM_MIN_SIZE:
        metrics["ms_ssim"] = multiscale_structural_similarity_index_measure(recon, real, data_range=1.0,
                                                                            reduction="none")
    return metrics


def log_weights(model: VAE, x: torch.Tensor, family: str, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K importance samples z_k ~ q(z|x) -> (log p(x|z_k) (K, B), log w_k = log p(x, z_k) - log q(z_k|x) (K, B)),
    with p(x|z) the decoder's own distribution (its mean and scale; scale 1 if it has
    none) integrated over 8-bit bins."""
    posterior = model.encode(x)
    log_px, log_w = [], []
    for _ in range(samples):
        z = posterior.sample()
        mean, log_scale = model.decode_distribution(z)
        lp = discretized_log_likelihood(x, mean, 0.0 if log_scale is None else log_scale, family).flatten(1).sum(1)
        log_q = posterior.log_prob(z).flatten(1).sum(1)
        log_p = posterior.prior_log_prob(z).flatten(1).sum(1)
        log_px.append(lp)
        log_w.append(lp + log_p - log_q)
    return torch.stack(log_px), torch.stack(log_w)


class FewImages(ImgvaeWarning):
    """A Fréchet distance over fewer images than its features' dimension."""


def warn_few_images(networks, n: int) -> None:
    """One line per feature network whose Fréchet distances rest on fewer images than its dimension."""
    for net in networks:
        if n < net.dims:
            warnings.warn(f"{net.name} rests on {n} images, fewer than its {net.dims} feature dimensions: biased "
                          "upwards, compare it only at equal n (KID beside it is unbiased)", FewImages, stacklevel=3)


class _Tally:
    """What an evaluation accumulates: per-image metrics, latent moments, and feature
    statistics per (network, image set)."""

    def __init__(self, networks, sample_kinds: tuple[str, ...]):
        self.networks, self.sample_kinds = networks, sample_kinds
        self.features = {(net.name, kind): FeatureSet() for net in networks
                         for kind in ("real", "recon", "reference", *sample_kinds)}
        self.per_image: dict[str, list[torch.Tensor]] = {}
        self.kl_sum = self.mean_sum = self.mean_sq = None
        self.images = self.references = 0
        self.codes = None  # a discrete latent's code counts over the whole set

    def add_features(self, kind: str, images: torch.Tensor) -> None:
        for net in self.networks:
            self.features[net.name, kind].add(net(images))

    def add_per_image(self, name: str, values: torch.Tensor) -> None:
        self.per_image.setdefault(name, []).append(values.cpu())

    def add_codes(self, posterior: Quantized) -> None:
        counts = torch.bincount(posterior.indices.flatten().long().cpu(), minlength=posterior.codebook_size)
        self.codes = counts if self.codes is None else self.codes + counts
        self.tokens = posterior.indices[0].numel()

    def add_latents(self, kl: torch.Tensor, mu: torch.Tensor) -> None:
        """Per-image KL and posterior means, (B, D) float64."""
        if self.kl_sum is None:
            self.kl_sum = torch.zeros_like(kl[0])
            self.mean_sum, self.mean_sq = torch.zeros_like(mu[0]), torch.zeros_like(mu[0])
        self.kl_sum += kl.sum(0)
        self.mean_sum += mu.sum(0)
        self.mean_sq += mu.pow(2).sum(0)


class _Samples:
    """Decodes prior samples with seeded noise (N(0, I), and the fitted prior's from the
    same noise) and adds their features to a tally."""

    def __init__(self, model: VAE, prior: LatentPrior | None, seed: int):
        self.model, self.prior, self.seed = model, prior, seed
        self.kinds = ("samples", "samples_fitted") if prior is not None else ("samples",)

    def add(self, tally: _Tally, count: int) -> None:
        device = next(self.model.parameters()).device
        for kind, p in zip(self.kinds, (None, self.prior)):
            z = prior_noise(self.model, count, self.seed) if p is None else latents(self.model, count, self.seed, p)
            tally.add_features(kind, denormalize(self.model.decode(z.to(device)).float()))
        self.seed += 1


def _held_out_pass(model: VAE, dataset, loader, tally: _Tally, family: str, cfg: Config, samples: _Samples | None,
                   bad: BadFiles, progress: bool, lpips: LPIPS | None) -> None:
    """Reconstructions, likelihood and latents of every held-out image (and, when samples
    are scored against them, as many prior samples)."""
    iw = cfg.eval.iw_samples
    for images, indices, bad_items in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
        bad.add(dataset, bad_items)
        if len(images) == 0:
            continue
        device = next(model.parameters()).device
        x = normalize(images.to(device))
        posterior = model.encode(x)
        real = images.float().div(255).to(device)
        # Rounded to 8 bits: the scores are those of the reconstruction a user sees as a PNG.
        recon = denormalize(model.decode(posterior.mean).float()).mul(255).round().div(255)
        tally.add_per_image("index", indices)
        for k, v in image_metrics(real, recon).items():
            tally.add_per_image(k, v)
        if lpips is not None:
            tally.add_per_image("lpips", lpips(real, recon))
        log_px, log_w = log_weights(model, x, family, iw)
        kl = posterior.kl().double().flatten(1)
        tally.add_per_image("recon_nats", -log_px.mean(0))
        tally.add_per_image("kl_nats", kl.sum(1))
        tally.add_per_image("iw_nats", -(torch.logsumexp(log_w, 0) - math.log(iw)))
        tally.add_latents(kl, posterior.mean.double().flatten(1))
        if isinstance(posterior, Quantized):
            tally.add_codes(posterior)
        tally.add_features("real", real)
        tally.add_features("recon", recon)
        if samples is not None:
            samples.add(tally, len(images))
        tally.images += len(images)


def _reference_pass(dataset, loader, tally: _Tally, samples: _Samples, bad: BadFiles, progress: bool) -> None:
    """Real images the samples are scored against, and as many samples."""
    device = next(samples.model.parameters()).device
    for images, _, bad_items in tqdm(loader, desc="samples", disable=not progress, dynamic_ncols=True):
        bad.add(dataset, bad_items)
        tally.add_features("reference", images.float().div(255).to(device))
        samples.add(tally, len(images))
        tally.references += len(images)


@torch.no_grad()
def evaluate(model: VAE, cfg: Config, sources: list[str], prior: LatentPrior | None = None,
             progress: bool = True, held_out: ImageDataset | None = None, per_image: bool = False) -> Metrics:
    """All metrics over the whole held-out set `sources` (preprocessed as cfg.data's eval
    split), as cfg.eval says (iw_samples, batch_size, limit, seed, fid_weights,
    sample_reference). Deterministic for a given seed: reconstructions decode the
    posterior mean; the ELBO / IW samples and prior samples use seeded noise. With a
    fitted `prior`, its samples are scored too (fd_*_samples_fitted), from the same noise
    as N(0, I)'s. Samples are scored against the held-out images, or against
    eval.sample_reference (as many samples as images) when the held-out images do not
    share the training distribution: a perfect generator of the training images would
    otherwise score worse than a blurry one. held_out: these views instead of the sources'
    (several models scored on the same pixels); per_image: add each image's key, PSNR, SSIM
    (and LPIPS) as metrics["per_image"]."""
    ec = cfg.eval
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(cfg.eval_seed)

    def loader_of(specs: list[str], first: int = 0, dataset: ImageDataset | None = None):
        """Images of `specs` preprocessed as the eval split (the first `first`; 0: all) -> (dataset, loader)."""
        dataset = dataset or build_dataset(specs, cfg.data, train=False, seed=cfg.train.seed)
        indices = list(range(min(first, len(dataset)) if first else len(dataset)))
        workers = loader_workers(dataset, cfg.data.num_workers, device)
        return dataset, eval_loader(dataset, cfg.eval_batch_size, device, workers, indices)

    networks = feature_networks(ec.fid_weights, device)  # a bad weights file fails before any image is read
    lpips = LPIPS(ec.lpips_weights).to(device) if ec.lpips_weights else None
    dataset, loader = loader_of(sources, ec.limit, held_out)
    samples = _Samples(model, prior, cfg.eval_seed)
    tally, bad = _Tally(networks, samples.kinds), BadFiles()
    family = LIKELIHOOD_FAMILY[cfg.loss.likelihood]
    _held_out_pass(model, dataset, loader, tally, family, cfg, None if ec.sample_reference else samples, bad, progress,
                   lpips)
    if tally.images < 2:  # a Fréchet distance, a standard deviation need two
        raise SourceError(f"evaluating needs at least 2 readable images; {sources} gave {tally.images}"
                          f"{' (eval.limit=' + str(ec.limit) + ')' if ec.limit else ''}")
    tally.references = 0 if ec.sample_reference else tally.images
    if ec.sample_reference:
        _reference_pass(*loader_of(ec.sample_reference), tally, samples, bad, progress)
        if tally.references < 2:
            raise SourceError(f"scoring samples needs at least 2 readable images in {ec.sample_reference}")
    metrics = _metrics(tally, cfg, sources, model, prior, family, bad)
    warn_few_images(networks, min(tally.images, tally.references))
    metrics.preprocessing = preprocessing(dataset.cfg)
    # Which files FID / LPIPS came from, and whether they are the published ones.
    metrics.feature_weights = {n.name: n.weights for n in [*networks, lpips] if hasattr(n, "weights")} or None
    if per_image:
        values = {k: torch.cat(tally.per_image[k]).tolist() for k in ("index", "psnr", "ssim", "lpips")
                  if k in tally.per_image}
        metrics.per_image = {"keys": [dataset.view_name(int(i)) for i in values.pop("index")], **values}
    return metrics


def _metrics(tally: _Tally, cfg: Config, sources: list[str], model: VAE, prior: LatentPrior | None, family: str,
             bad: BadFiles) -> Metrics:
    """The typed results of a finished tally."""
    values = {k: torch.cat(v) for k, v in tally.per_image.items()}
    n, size, ec = tally.images, cfg.data.image_size, cfg.eval
    dims = 3 * size * size
    neg_elbo = values["recon_nats"] + values["kl_nats"]
    mean_var = (tally.mean_sq / n - (tally.mean_sum / n).pow(2)).clamp(min=0)
    reference = "reference" if ec.sample_reference else "real"  # the real images samples are scored against
    scale = "learned scale" if model.scale != "none" else "scale 1 on the [-1, 1] scale"
    return Metrics(
        images=n, image_size=size, sources=list(sources), seed=cfg.eval_seed, skipped_files=len(bad),
        reconstruction=Reconstruction(**{k: _spread(values[k]) if k in values else None
                                         for k in ("mse", "psnr", "ssim", "ms_ssim", "lpips")}),
        likelihood=Likelihood(
            discretisation=f"the decoder's {family} (its mean and {scale}) integrated over the 256 8-bit bins "
            "of each subpixel; bits/dim divide nats by 3*S*S*ln 2",
            neg_elbo_nats=float(neg_elbo.mean()), recon_nats=float(values["recon_nats"].mean()),
            kl_nats=float(values["kl_nats"].mean()), neg_elbo_bpd=float(bits_per_dim(neg_elbo.mean(), dims)),
            iw_samples=ec.iw_samples, neg_iw_nats=float(values["iw_nats"].mean()),
            neg_iw_bpd=float(bits_per_dim(values["iw_nats"].mean(), dims))),
        latent=Latent(dims=len(tally.kl_sum), active_units=int((mean_var > ACTIVE_THRESHOLD).sum()),
                      active_threshold=ACTIVE_THRESHOLD, kl_per_dim=[float(v) for v in tally.kl_sum / n],
                      posterior_mean_var=[float(v) for v in mean_var]),
        distribution=distribution(tally, reference),
        samples_reference={"sources": list(ec.sample_reference or sources), "images": tally.references,
                           "held_out": not ec.sample_reference},
        prior={"samples": "N(0, I)",
               **({"samples_fitted": f"{prior.describe()} (prior.safetensors)"} if prior is not None else {})},
        codebook=codebook_health(tally.codes, tally.tokens) if tally.codes is not None else None,
    )


def distribution(tally: _Tally, reference: str) -> Distribution:
    """Each feature network's Fréchet distance and KID of the reconstructions against the held-out
    images and of each prior's samples against `reference`, with the images they rest on."""
    values = {}
    for net in tally.networks:
        for kind in ("recon", *tally.sample_kinds):
            real = tally.features[net.name, "real" if kind == "recon" else reference].tensor()
            other = tally.features[net.name, kind].tensor()
            values[f"{net.name}_{kind}"] = frechet_distance(real, other)
            values[f"{net.kid}_{kind}"] = kernel_distance(real, other)
    return Distribution(note="Fréchet distances are biased upwards when n is below the features' dimension "
                        "(1280 for fd_effnet, 2048 for FID): compare them only at equal n; KID is unbiased",
                        images=tally.images, sample_images=tally.references, **values)


def _spread(values: torch.Tensor) -> Spread:
    values = values.double()
    return Spread(mean=float(values.mean()), std=float(values.std()) if len(values) > 1 else 0.0)


def codebook_health(counts: torch.Tensor, tokens: int) -> Codebook:
    """A discrete latent's codebook over the whole evaluated set (code_usage), and its rate:
    bits per image = tokens x log2(codebook size); set_tokens: the tokens counted, all images."""
    return Codebook(**code_usage(counts), tokens=tokens, set_tokens=int(counts.sum()),
                    bits_per_image=tokens * math.log2(len(counts)))
