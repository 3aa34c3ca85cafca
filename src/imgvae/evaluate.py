"""Evaluate a trained VAE on a held-out set: reconstruction quality, likelihood
(ELBO and an importance-weighted bound, in nats and bits/dim), latent health
(KL per dimension, active units) and Fréchet distances in a feature space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from tqdm import tqdm

from .checkpoint import load_model, resolve_checkpoint
from .config import Config, ConfigError
from .data import BadFiles, ImageDataset, build_dataset, collate, denormalize, loader_workers, normalize, to_model_input
from .features import GaussianStats, feature_networks, frechet_distance
from .losses import LIKELIHOOD_FAMILY, LOG_SCALE_RANGE, bits_per_dim, discretized_log_likelihood, vae_loss
from .models import VAE
from .prior import LatentPrior, load_prior
from .runtime import pick_device
from .sample import prior_noise
from .sources import SourceError

ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): unit u is active if Cov_x(E[z_u | x]) > 0.01
MS_SSIM_MIN_SIZE = 161  # 5 scales of an 11-px kernel


def image_metrics(real: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR, SSIM (and MS-SSIM when the size allows) of [0, 1] images (B, 3, S, S)."""
    metrics = {
        "mse": (real - recon).pow(2).flatten(1).mean(1),
        "psnr": peak_signal_noise_ratio(recon, real, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(recon, real, data_range=1.0, reduction="none"),
    }
    if real.shape[-1] >= MS_SSIM_MIN_SIZE:
        metrics["ms_ssim"] = multiscale_structural_similarity_index_measure(recon, real, data_range=1.0, reduction="none")
    return metrics


def log_weights(model: VAE, x: torch.Tensor, family: str, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K importance samples z_k ~ q(z|x) -> (log p(x|z_k) (K, B), log w_k = log p(x, z_k) - log q(z_k|x) (K, B)),
    with p(x|z) the decoder's own distribution (its mean and scale; scale 1 if it has
    none) integrated over 8-bit bins."""
    posterior = model.encode(x)
    log_px, log_w = [], []
    normal_const = 0.5 * math.log(2 * math.pi)
    for _ in range(samples):
        z = posterior.sample()
        mean, log_scale = model.decode_distribution(z)
        log_scale = 0.0 if log_scale is None else log_scale.clamp(*LOG_SCALE_RANGE)
        lp = discretized_log_likelihood(x, mean, log_scale, family).flatten(1).sum(1)
        eps2 = ((z - posterior.mean).pow(2) / posterior.logvar.exp()).double()
        log_q = (-0.5 * eps2 - 0.5 * posterior.logvar.double() - normal_const).flatten(1).sum(1)
        log_p = (-0.5 * z.double().pow(2) - normal_const).flatten(1).sum(1)
        log_px.append(lp)
        log_w.append(lp + log_p - log_q)
    return torch.stack(log_px), torch.stack(log_w)


@torch.no_grad()
def eval_loss(model: VAE, loader, dataset: ImageDataset, cfg: Config, device, bad: BadFiles) -> dict[str, float]:
    """Mean loss over the held-out set, reconstructing from the posterior mean
    (deterministic); the KL term is exact."""
    model.eval()
    totals, count = {}, 0
    for images, _, bad_items in loader:
        bad.add(dataset, bad_items)
        if len(images) == 0:
            continue
        x = to_model_input(images, device)
        _, stats = vae_loss(x, model(x, sample=False), cfg.loss)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(images)
        count += len(images)
    model.train()
    return {k: v / count for k, v in totals.items()} if count else {}


def _mean_std(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0}


@torch.no_grad()
def evaluate(
    model: VAE,
    cfg: Config,
    sources: list[str],
    *,
    iw_samples: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    fid_weights: str | Path | None = None,
    limit: int = 0,
    prior: LatentPrior | None = None,
    sample_reference: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """All metrics over the whole held-out set `sources` (preprocessed as cfg.data's
    eval split). Deterministic for a given seed: reconstructions decode the
    posterior mean; the ELBO / IW samples and prior samples use seeded noise.
    limit > 0: only the first `limit` images. With a fitted `prior`, its samples
    are scored too (fd_*_samples_fitted), from the same noise as N(0, I)'s.
    Samples are scored against the held-out images, or against `sample_reference`
    (preprocessed as the eval split, as many samples as images) when the held-out
    images do not share the training distribution: a perfect generator of the
    training images would otherwise score worse than a blurry one."""
    if iw_samples < 1:
        raise ConfigError(f"iw_samples must be >= 1, got {iw_samples}")
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)

    def eval_split_loader(specs: list[str], first: int = 0):
        """Images of `specs` preprocessed as the eval split (the first `first`; 0: all) -> (dataset, loader)."""
        dataset = build_dataset(specs, cfg.data, train=False, seed=cfg.train.seed)
        subset = torch.utils.data.Subset(dataset, range(min(first, len(dataset)) if first else len(dataset)))
        return dataset, torch.utils.data.DataLoader(
            subset, batch_size=batch_size, num_workers=loader_workers(dataset, cfg.data.num_workers, device),
            collate_fn=collate, pin_memory=device.type == "cuda")

    dataset, loader = eval_split_loader(sources, limit)
    family = LIKELIHOOD_FAMILY[cfg.loss.likelihood]
    networks = feature_networks(fid_weights, device)
    sample_kinds = ("samples", "samples_fitted") if prior is not None else ("samples",)
    reference = "reference" if sample_reference else "real"  # the real images samples are scored against
    stats = {(net.name, kind): GaussianStats() for net in networks for kind in ("real", "recon", "reference", *sample_kinds)}
    per_image: dict[str, list[torch.Tensor]] = {}
    kl_sum = mean_sum = mean_sq = None
    n, noise_seed = 0, seed
    bad = BadFiles()

    def add_samples(count: int) -> None:
        nonlocal noise_seed
        for kind, p in zip(sample_kinds, (None, prior)):
            fakes = denormalize(model.decode(prior_noise(model, count, noise_seed, prior=p).to(device)).float())
            for net in networks:
                stats[net.name, kind].add(net(fakes))
        noise_seed += 1

    for images, _, bad_items in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
        bad.add(dataset, bad_items)
        if len(images) == 0:
            continue
        x = normalize(images.to(device))
        posterior = model.encode(x)
        real = images.float().div(255).to(device)
        # Rounded to 8 bits: the scores are those of the reconstruction a user sees as a PNG.
        recon = denormalize(model.decode(posterior.mean).float()).mul(255).round().div(255)
        for k, v in image_metrics(real, recon).items():
            per_image.setdefault(k, []).append(v.cpu())
        log_px, log_w = log_weights(model, x, family, iw_samples)
        kl = posterior.kl().double().flatten(1)
        per_image.setdefault("recon_nats", []).append(-log_px.mean(0).cpu())
        per_image.setdefault("kl_nats", []).append(kl.sum(1).cpu())
        per_image.setdefault("iw_nats", []).append(-(torch.logsumexp(log_w, 0) - math.log(iw_samples)).cpu())
        mu = posterior.mean.double().flatten(1)
        if kl_sum is None:
            kl_sum, mean_sum, mean_sq = torch.zeros_like(kl[0]), torch.zeros_like(mu[0]), torch.zeros_like(mu[0])
        kl_sum += kl.sum(0)
        mean_sum += mu.sum(0)
        mean_sq += mu.pow(2).sum(0)
        for net in networks:
            stats[net.name, "real"].add(net(real))
            stats[net.name, "recon"].add(net(recon))
        if not sample_reference:
            add_samples(len(images))
        n += len(images)
    if n == 0:
        raise SourceError(f"no readable image in {sources}")
    n_reference = n
    if sample_reference:
        reference_data, reference_loader = eval_split_loader(sample_reference)
        n_reference = 0
        for images, _, bad_items in tqdm(reference_loader, desc="samples", disable=not progress, dynamic_ncols=True):
            bad.add(reference_data, bad_items)
            for net in networks:
                stats[net.name, "reference"].add(net(images.float().div(255).to(device)))
            add_samples(len(images))
            n_reference += len(images)
        if n_reference < 2:
            raise SourceError(f"scoring samples needs at least 2 readable images in {sample_reference}")

    values = {k: torch.cat(v) for k, v in per_image.items()}
    size = cfg.data.image_size
    dims = 3 * size * size
    neg_elbo = values["recon_nats"] + values["kl_nats"]
    mean_var = (mean_sq / n - (mean_sum / n).pow(2)).clamp(min=0)
    metrics = {
        "images": n,
        "image_size": size,
        "sources": list(sources),
        "seed": seed,
        "skipped_files": len(bad),
        "reconstruction": {
            "note": "posterior mean decoded, rounded to 8 bits; metrics on [0, 1] pixels, mean and std over images",
            **{k: _mean_std(values[k]) for k in ("mse", "psnr", "ssim")},
            "ms_ssim": _mean_std(values["ms_ssim"]) if "ms_ssim" in values else None,
        },
        "likelihood": {
            "discretisation": f"the decoder's {family} (its mean and "
            f"{'learned scale' if model.scale != 'none' else 'scale 1 on the [-1, 1] scale'}) integrated over "
            "the 256 8-bit bins of each subpixel; bits/dim divide nats by 3*S*S*ln 2",
            "neg_elbo_nats": float(neg_elbo.mean()),
            "recon_nats": float(values["recon_nats"].mean()),
            "kl_nats": float(values["kl_nats"].mean()),
            "neg_elbo_bpd": float(bits_per_dim(neg_elbo.mean(), dims)),
            "iw_samples": iw_samples,
            "neg_iw_nats": float(values["iw_nats"].mean()),
            "neg_iw_bpd": float(bits_per_dim(values["iw_nats"].mean(), dims)),
        },
        "latent": {
            "dims": len(kl_sum),
            "active_units": int((mean_var > ACTIVE_THRESHOLD).sum()),
            "active_threshold": ACTIVE_THRESHOLD,
            "kl_per_dim": [float(v) for v in kl_sum / n],
            "posterior_mean_var": [float(v) for v in mean_var],
        },
        "distribution": {
            "note": f"Fréchet distances over {n} images per set ({n_reference} for samples); with fewer images than "
            "feature dimensions they are biased upwards: compare only at equal n",
            **{f"{net}_{kind}": frechet_distance(stats[net, "real" if kind == "recon" else reference], stats[net, kind])
               for net in dict.fromkeys(name for name, _ in stats) for kind in ("recon", *sample_kinds)},
        },
        "samples_reference": {"sources": list(sample_reference or sources), "images": n_reference,
                              "held_out": not sample_reference},
        "prior": {"samples": "N(0, I)", **({"samples_fitted": f"{prior.describe()} (prior.safetensors)"} if prior is not None else {})},
    }
    return metrics


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (RUN/checkpoints/NAME), if any."""
    run = resolve_checkpoint(checkpoint).resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None


def evaluate_checkpoint(checkpoint: str | Path, sources: list[str] | None = None, out: str | Path | None = None,
                        device: str = "auto", **kwargs) -> tuple[dict, Path]:
    """Load a checkpoint, evaluate it (default sources: its config's data.eval; its
    fitted prior when it has one) and write metrics.json (default: into its run
    folder). -> (metrics, path)."""
    model, cfg = load_model(checkpoint, pick_device(device))
    sources = sources or cfg.data.eval
    if not sources:
        raise ConfigError("no evaluation data: pass --data SOURCE (the run's config has no data.eval)")
    kwargs.setdefault("prior", load_prior(checkpoint))
    metrics = {"checkpoint": str(resolve_checkpoint(checkpoint).resolve()), **evaluate(model, cfg, sources, **kwargs)}
    run = run_dir_of(checkpoint)
    path = Path(out) if out else (run or Path(".")) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2))
    return metrics, path


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) rows summarising a metrics dict: the printed table and the report's."""
    rec, lik, lat, dist = (metrics[k] for k in ("reconstruction", "likelihood", "latent", "distribution"))
    rows = [("images", f"{metrics['images']} from {', '.join(metrics['sources'])}")]
    if "samples_reference" in metrics and not metrics["samples_reference"]["held_out"]:
        ref = metrics["samples_reference"]
        rows.append(("samples scored against", f"{ref['images']} images from {', '.join(ref['sources'])}"))
    for k in ("mse", "psnr", "ssim", "ms_ssim"):
        v = rec[k]
        rows.append((k.upper().replace("_", "-"), f"{v['mean']:.4f} ± {v['std']:.4f}" if v else "n/a (needs >= 161 px)"))
    rows += [
        ("-ELBO nats/image", f"{lik['neg_elbo_nats']:.1f} (recon {lik['recon_nats']:.1f} + KL {lik['kl_nats']:.1f})"),
        ("-ELBO bits/dim", f"{lik['neg_elbo_bpd']:.4f}"),
        (f"-IW bound (K={lik['iw_samples']}) bits/dim", f"{lik['neg_iw_bpd']:.4f} ({lik['neg_iw_nats']:.1f} nats/image)"),
        ("active units", f"{lat['active_units']} / {lat['dims']} (Cov_x E[z|x] > {lat['active_threshold']})"),
    ]
    return rows + [(k, f"{v:.3f}") for k, v in dist.items() if k != "note"]


def format_table(metrics: dict) -> str:
    """The printed summary of a metrics dict."""
    rows = metric_rows(metrics)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
