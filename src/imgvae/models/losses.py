"""Pure loss and likelihood functions on model outputs.

Training losses return (loss, {"name": detached scalar tensor}); stats stay
tensors so a GPU step needs no host sync (callers call .item() when logging).
Images are on the model's [-1, 1] scale; per-image sums run over 3 x S x S subpixels.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from imgvae.config import LossConfig
from imgvae.models.base import Quantized, VAEOutput

# 8-bit pixels on the model's [-1, 1] scale: 256 levels, bins 2/255 wide.
PIXEL_LEVELS = 256


def log_scale(out: VAEOutput) -> torch.Tensor:
    """The decoder's (clamped) log-scale; 0 (scale 1) when it has none."""
    if out.log_scale is None:
        return torch.zeros((), device=out.x_hat.device)
    return out.log_scale


def kl_weight(cfg: LossConfig, step: int, total_steps: int) -> float:
    """beta, ramped linearly from 0 over the first kl_warmup * total_steps steps."""
    ramp = cfg.kl_warmup * total_steps
    return cfg.beta * (min(1.0, step / ramp) if ramp > 0 else 1.0)


def reconstruction_nll(x: torch.Tensor, out: VAEOutput, cfg: LossConfig) -> torch.Tensor:
    """-log p(x|z) per image (B,), up to a constant for the continuous likelihoods:
    gaussian: 0.5 ((x - mu) / sigma)^2 + log sigma (the seed's 0.5 (x - mu)^2 at sigma 1);
    l1: |x - mu|; logistic: the exact discrete NLL in nats."""
    if cfg.likelihood == "logistic":
        return -discretized_log_likelihood(x, out.x_hat, log_scale(out), "logistic").flatten(1).sum(1).to(x.dtype)
    if cfg.likelihood == "l1":
        return (x - out.x_hat).abs().flatten(1).sum(1)
    if out.log_scale is None:
        return 0.5 * (x - out.x_hat).pow(2).flatten(1).sum(1)
    s = log_scale(out)
    return (0.5 * ((x - out.x_hat) * torch.exp(-s)).pow(2) + s).flatten(1).sum(1)


def vae_loss(
    x: torch.Tensor,
    out: VAEOutput,
    cfg: LossConfig,
    kl_scale: float | None = None,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch mean of reconstruction NLL + kl_scale (default beta) * KL(q(z|x) || N(0, I)),
    with free bits, plus the perceptual term when a distance (B,) function is given; for a
    discrete latent (Quantized) the quantiser's loss instead of the KL (a constant rate).
    Stats: loss, recon, kl (the plain KL, whatever the weighting; a discrete latent's rate), and
    more when used (quantizer: the quantiser's weighted term, what the loss adds to recon)."""
    recon = reconstruction_nll(x, out, cfg).mean()
    kl_per_dim = out.posterior.kl().flatten(1)  # (B, latent dims)
    kl = kl_per_dim.sum(1).mean()
    stats = {"recon": recon.detach(), "kl": kl.detach()}
    if isinstance(out.posterior, Quantized):  # a fixed rate; the quantiser's own loss instead
        quantizer = x[0].numel() * out.posterior.aux_loss  # a mean per element, as the recon's sum
        loss = recon + quantizer
        stats |= out.posterior.stats | {"quantizer": quantizer.detach()}
    else:
        penalised = kl_per_dim.mean(0).clamp(min=cfg.free_bits).sum() if cfg.free_bits > 0 else kl
        loss = recon + (cfg.beta if kl_scale is None else kl_scale) * penalised
    if perceptual is not None and cfg.perceptual > 0:
        distance = perceptual(x, out.x_hat).mean()
        loss = loss + cfg.perceptual * x[0].numel() * distance
        stats["perceptual"] = distance.detach()
    if out.log_scale is not None:
        stats["sigma"] = log_scale(out).exp().mean().detach()
    stats["loss"] = loss.detach()
    return loss, stats


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(recon_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming-transformers' balance: ||grad recon|| / ||grad gan|| at the decoder's last
    layer, clamped to [0, 1e4] and detached."""
    recon_grad = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (recon_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _log_cdf(t: torch.Tensor, family: str) -> torch.Tensor:
    if family == "gaussian":
        return torch.special.log_ndtr(t)
    if family == "logistic":
        return F.logsigmoid(t)
    # Laplace: 0.5 e^t below the mean, 1 - 0.5 e^-t above
    return torch.where(t < 0, t - math.log(2.0), torch.log1p(-0.5 * torch.exp(-t.clamp(min=0))))


def discretized_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | float,
                               family: str = "gaussian") -> torch.Tensor:
    """log P(x) per element for a symmetric location-scale distribution (gaussian,
    logistic, laplace) integrated over the 8-bit bin of x.

    x holds 8-bit levels on [-1, 1] (k / 127.5 - 1); the bins are [x - 1/255,
    x + 1/255], the outermost ones open to -inf / +inf, so P sums to 1 over the
    256 levels. Computed in float64 on the lower tail (by symmetry), where the log
    CDF is accurate, as log F(hi) + log(1 - F(lo) / F(hi)).
    """
    x, mean = x.double(), mean.double()
    log_scale = torch.as_tensor(log_scale, device=x.device).double()
    half = 1.0 / (PIXEL_LEVELS - 1)
    inv = torch.exp(-log_scale)
    lo = (x - half - mean) * inv
    hi = (x + half - mean) * inv
    lo = torch.where(x < -1 + half, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(x > 1 - half, torch.full_like(hi, math.inf), hi)
    upper = (x - mean) > 0  # mirror the upper tail onto the lower one
    lo, hi = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
    log_hi = _log_cdf(hi, family)
    gap = (_log_cdf(lo, family) - log_hi).clamp(max=-1e-30)
    return log_hi + torch.log(-torch.expm1(gap))


LIKELIHOOD_FAMILY = {"gaussian": "gaussian", "logistic": "logistic", "l1": "laplace"}


def bits_per_dim(nats_per_image: float | torch.Tensor, dims: int):
    """Negative log-likelihood in nats per image -> bits per dimension."""
    return nats_per_image / (dims * math.log(2))
