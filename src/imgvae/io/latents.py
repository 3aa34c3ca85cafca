"""Latents for a second-stage model (`imgvae encode`): every image's posterior mean (and, when
asked, log-variance) in one memory-mapped array, the source of each row, and the statistics a
diffusion model scales its inputs with; resumable like `imgvae prepare`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imgvae.config import ConfigError
from imgvae.data.cache import ChunkedOutput
from imgvae.data.datasets import ImageDataset, left_out_before, preprocessing
from imgvae.data.decode import normalize
from imgvae.data.labels import LABELS_FILE, Labels, view_files
from imgvae.data.loading import eval_loader, loader_workers
from imgvae.data.sources import SourceError
from imgvae.metrics.features import RepresentationFeatures
from imgvae.models.base import VAE, inference

LATENTS_FORMAT, LATENTS_VERSION = "imgvae-latents", 1
ALIGN_GRID = 8  # the stored features' side: a flow prior's alignment resizes them to its layer's grid
LATENT_SCALES = ("keep", "recompute")


def token_dtype(codebook_size: int) -> type:
    """The smallest unsigned integer type that holds every index of a codebook."""
    return next(t for t in (np.uint8, np.uint16, np.uint32) if codebook_size - 1 <= np.iinfo(t).max)


def _own_scale(model_cfg) -> dict | None:
    own = getattr(model_cfg, "scaling_factor", None)
    return None if own is None else {"scaling_factor": own, "shift_factor": model_cfg.shift_factor}


def scale_choice(model_cfg, choice: str | None = None) -> str:
    """--latent-scale checked before any work: "keep" the model's own latent scale
    (model.scaling_factor / shift_factor, e.g. a diffusers folder's) or "recompute" it from
    the images (default: keep when the model has one)."""
    if choice not in (None, *LATENT_SCALES):
        raise ConfigError(f"--latent-scale {choice!r} is not one of {list(LATENT_SCALES)}")
    if choice == "keep" and _own_scale(model_cfg) is None:
        raise ConfigError(f"--latent-scale keep: model {model_cfg.name!r} has no latent scale of its own (it did not "
                          "start from a diffusers folder and sets no model.scaling_factor); use --latent-scale "
                          "recompute")
    return choice or ("keep" if _own_scale(model_cfg) else "recompute")


def latent_scale(model_cfg, stats: dict, choice: str | None = None) -> dict:
    """The latent scale to give a second-stage model, z = (sample - shift_factor) * scaling_factor,
    by scale_choice, with the model's own and the measured one (from `stats`) both on record.
    -> {"choice", "scaling_factor", "shift_factor", "own", "measured"}."""
    choice, own = scale_choice(model_cfg, choice), _own_scale(model_cfg)
    measured = {"scaling_factor": stats["scaling_factor"], "shift_factor": stats["shift_factor"]}
    return {"choice": choice, **(own if choice == "keep" else measured), "own": own, "measured": measured}


def describe_scale(scale: dict) -> str:
    """latent_scale's record in one line."""
    def pair(s):
        shift = "none" if s["shift_factor"] is None else f"{s['shift_factor']:.5g}"
        return f"scaling_factor {s['scaling_factor']:.5g}, shift_factor {shift}"
    if scale["choice"] == "keep":
        return f"{pair(scale)} (the model's own, kept; measured: {pair(scale['measured'])})"
    own = f"; its own was {pair(scale['own'])}" if scale["own"] else ""
    return f"{pair(scale)} (measured on these images{own})"


class LatentMoments:
    """Per-channel moments of the aggregate posterior, accumulated in float64 over images:
    channel c of a latent (C, ...) pools its positions; a flat latent (D,) has D channels."""

    def __init__(self):
        self.count = 0
        self.sum = self.sum_sq = self.var_sum = None

    def add(self, mean: np.ndarray | torch.Tensor, posterior_var: np.ndarray | torch.Tensor) -> None:
        """mean (B, C, ...) posterior means; posterior_var (B, C): each image's mean of
        exp(logvar) over channel c's positions."""
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float64)
        mean = mean.flatten(2) if mean.dim() > 2 else mean[:, :, None]  # (B, C, positions)
        var = torch.as_tensor(np.asarray(posterior_var), dtype=torch.float64)
        if self.sum is None:
            self.sum, self.sum_sq, self.var_sum = (torch.zeros(mean.shape[1], dtype=torch.float64) for _ in range(3))
        self.sum += mean.sum((0, 2))
        self.sum_sq += mean.pow(2).sum((0, 2))
        self.var_sum += var.sum(0) * mean.shape[2]
        self.count += mean.shape[0] * mean.shape[2]

    def statistics(self) -> dict:
        """channel_mean / channel_std of the posterior means; shift_factor and scaling_factor
        such that (z - shift_factor) * scaling_factor has mean 0 and variance 1 for z ~ q(z|x)
        over all the images and latent elements (Var = Var[mu] + E[sigma^2])."""
        n = self.count
        channel_mean = self.sum / n
        channel_var = (self.sum_sq / n - channel_mean.pow(2)).clamp(min=0)
        mean = float(channel_mean.mean())
        total_var = float((self.sum_sq.sum() + self.var_sum.sum()) / (n * len(self.sum)) - mean**2)
        return {"channel_mean": channel_mean.tolist(), "channel_std": channel_var.sqrt().tolist(),
                "posterior_var_mean": (self.var_sum / n).tolist(), "shift_factor": mean,
                "scaling_factor": 1.0 / max(total_var, 1e-12) ** 0.5}


def _posterior_var(logvar: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) log-variances -> (B, C) means of the variances over each channel's positions."""
    var = logvar.double().exp()
    return var.flatten(2).mean(2) if var.dim() > 2 else var


def latent_moments(model: VAE, dataset, batch_size: int, limit: int = 0, progress: bool = False) -> dict:
    """LatentMoments.statistics of `limit` images spread evenly over the dataset (0: all)."""
    count = min(limit, len(dataset)) if limit else len(dataset)
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    moments = LatentMoments()
    with inference(model) as device:
        for images, _, _ in tqdm(eval_loader(dataset, batch_size, device, indices=indices), desc="latent statistics",
                                 disable=not progress, dynamic_ncols=True):
            if len(images):
                posterior = model.encode(normalize(images.to(device)))
                moments.add(posterior.mean.double().cpu(), _posterior_var(posterior.logvar).cpu())
    if moments.count == 0:
        raise SourceError("no readable image to compute latent statistics on")
    return moments.statistics()


def encode_dataset(model: VAE, dataset: ImageDataset, out: str | Path, specs: list[str], checkpoint: Path, *,
                   batch: int, num_workers, logvar: bool = False, chunk: int = 1024, progress: bool = True,
                   model_cfg=None, scale: str | None = None, labels: Labels | None = None,
                   features: RepresentationFeatures | None = None) -> dict:
    """Encode every view of `dataset` (made from the sources `specs`) into the folder `out`:
      latents.npy        (N, *latent_shape) float32 posterior means, memory-mapped when read
      logvar.npy         the same shape, the log-variances (with logvar=True)
      posterior_var.npy  (N, C) each image's mean posterior variance per latent channel
      tokens.npy         (N, h, w) the code indices of a discrete latent, in the smallest
                         unsigned integer type that holds the codebook (token_dtype)
      keys.json, valid.npy  the source of each row; the rows that decoded
      labels.npy         (N, vocabulary) uint8, each row's label set (with data.labels), the
                         vocabulary and the misses in the manifest
      align_features.npy (N, 112, 8, 8) float16, a frozen network's features of each view, what a
                         flow prior's alignment (REPA, prior.align) matches (with `features`)
      manifest.json      the checkpoint, preprocessing, counts, skipped files, statistics and the
                         latent scale (latent_scale of model_cfg: its own and the measured one)
    An interrupted run of the same command resumes. -> the manifest."""
    scale_choice(model_cfg, scale)  # a refusal before any work
    chunk = max(batch, chunk // batch * batch)  # whole batches per chunk
    plan = {"checkpoint": str(checkpoint), "sources": [s.name for s in dataset.source.sources], "rows": len(dataset),
            "chunk": chunk, "preprocessing": preprocessing(dataset.cfg), "logvar": logvar}
    shape, channels = (len(dataset), *model.latent_shape), model.latent_shape[0]
    arrays = {"latents": (shape, np.float32), "posterior_var": ((len(dataset), channels), np.float32)}
    if logvar:
        arrays["logvar"] = (shape, np.float32)
    if features is not None:
        arrays["align_features"] = ((len(dataset), features.CHANNELS, ALIGN_GRID, ALIGN_GRID), np.float16)
    if model.discrete:  # its code indices too
        arrays["tokens"] = ((len(dataset), *model.token_shape), token_dtype(model.codebook_size))
    output = ChunkedOutput(Path(out), plan, arrays)
    started = time.time()
    _encode_pending(model, dataset, output, batch, num_workers, progress, f"encode {Path(out).name}", features)
    valid, skipped = output.index(dataset, specs)
    skipped = left_out_before(dataset) | skipped
    if labels is not None:
        np.save(output.partial / LABELS_FILE, labels.multi_hot(view_files(dataset)))
        labels.warn()
    moments = LatentMoments()
    for start in range(0, len(valid), chunk):
        rows = valid[start : start + chunk]
        moments.add(output.arrays["latents"][rows], output.arrays["posterior_var"][rows])
    stats = moments.statistics()
    return output.complete({
        "format": LATENTS_FORMAT, "version": LATENTS_VERSION, "checkpoint": plan["checkpoint"],
        "preprocessing": plan["preprocessing"], "sources": plan["sources"], "latent_shape": list(model.latent_shape),
        "rows": len(dataset), "count": int(len(valid)), "skipped": skipped, "statistics": stats,
        "latent_scale": latent_scale(model_cfg, stats, scale), "seconds_last_run": round(time.time() - started, 2),
        **({"tokens": {"shape": list(model.token_shape), "codebook_size": model.codebook_size,
                       "dtype": np.dtype(token_dtype(model.codebook_size)).name}} if "tokens" in arrays else {}),
        **({"labels": labels.record()} if labels is not None else {}),
        **({"align_features": features.record(ALIGN_GRID)} if features is not None else {}),
    })


def _encode_pending(model: VAE, dataset: ImageDataset, output: ChunkedOutput, batch: int, num_workers,
                    progress: bool, desc: str, features: RepresentationFeatures | None = None) -> None:
    """Encode the chunks not written yet, in one pass of a loader over their rows (each batch
    lies in one chunk: chunks are whole batches)."""
    rows = [r for c in output.pending() for r in output.rows_of(c)]
    bar = output.progress_bar(progress, desc)
    current = None
    with inference(model) as device:
        features = features.to(device) if features is not None else None
        loader = eval_loader(dataset, batch, device, loader_workers(dataset, num_workers, device), indices=rows)
        for first, (images, indices, bad) in zip(rows[::batch], loader):
            if current != first // output.chunk:  # a new chunk starts here
                current = first // output.chunk
                span = output.rows_of(current)
                values = {name: np.zeros((len(span), *a.shape[1:]), a.dtype) for name, a in output.arrays.items()}
                skipped = []
            skipped += [{"row": i, "key": dataset.key(i), "reason": reason} for i, reason in bad]
            if len(images):
                posterior = model.encode(normalize(images.to(device)))
                at = (indices - span.start).numpy()
                values["latents"][at] = posterior.mean.float().cpu().numpy()
                values["posterior_var"][at] = _posterior_var(posterior.logvar).float().cpu().numpy()
                if "logvar" in values:
                    values["logvar"][at] = posterior.logvar.float().cpu().numpy()
                if "tokens" in values:
                    values["tokens"][at] = posterior.indices.cpu().numpy().astype(values["tokens"].dtype)
                if features is not None:
                    maps = features(images.to(device).float() / 255, ALIGN_GRID)
                    values["align_features"][at] = maps.half().cpu().numpy()
            bar.update(len(images) + len(bad))
            if first + batch >= span.stop:  # the chunk's last batch
                output.write(current, values, skipped)
    bar.close()
