"""What each `imgvae` verb does, as a function a notebook calls with paths: open the model a
path names, read the images, call the library, write the files. cli.py only parses arguments
and calls these; `imgvae train` is workflow.train_and_evaluate, `fit-prior` and `train-prior`
are priors.gmm.fit_checkpoint_prior and priors.learned.train_prior."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from imgvae.config import ConfigError, DataConfig
from imgvae.data.datasets import build_dataset, load_image_file
from imgvae.data.decode import normalize
from imgvae.data.labels import read_labels
from imgvae.evaluation.evaluate import evaluate
from imgvae.evaluation.generation import score_priors
from imgvae.evaluation.results import Metrics
from imgvae.io.latents import encode_dataset
from imgvae.io.paths import open_for, provenance_of
from imgvae.io.pictures import save_grid
from imgvae.models.base import VAE
from imgvae.models.generate import interpolate, reconstruct
from imgvae.priors import sampler
from imgvae.priors.gmm import fitted_prior_of
from imgvae.rundir import METRICS, write_text_atomic


def evaluate_checkpoint(checkpoint: str | Path, sources: list[str] | None = None, out: str | Path | None = None,
                        overrides: list[str] | dict | None = None, device: str = "auto", progress: bool = True
                        ) -> tuple[Metrics, Path | None]:
    """Evaluate a model as its config's `eval` section says (overrides of the data, eval and prior
    sections such as "eval.iw_samples=64" change it; its fitted prior when it has one) on `sources`,
    one centre view per image, or by default on its data.eval as the run saw it, and write
    metrics.json (default: into its run folder; a model without one writes nothing unless `out`
    is given). -> (metrics, path or None)."""
    model, cfg, folder = open_for(checkpoint, sources, overrides, device)
    sources = sources or cfg.data.eval
    if not sources:
        raise ConfigError("no evaluation data: pass --data SOURCE (the run's config has no data.eval)")
    metrics = evaluate(model, cfg, sources, prior=fitted_prior_of(model), progress=progress)
    metrics.checkpoint = str(folder)
    if cfg.eval.generation_images:
        metrics.generation = score_priors(model, cfg, sources, progress)
    run = provenance_of(model).run
    path = Path(out) if out else (run / METRICS if run is not None else None)
    if path is None:  # a model without a run folder: nothing is written unless asked (-o)
        return metrics, None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(metrics.to_dict(), indent=2))
    return metrics, path


def encode_latents(checkpoint: str | Path, out: str | Path, sources: list[str] | None = None, *,
                   logvar: bool = False, overrides: list[str] | dict | None = None, device: str = "auto",
                   chunk: int = 1024, scale: str | None = None, progress: bool = True) -> dict:
    """Encode every image of `sources` (default: the run's data.train), one centre view each
    unless overrides say otherwise, into the folder `out` (io.latents.encode_dataset says what
    it holds; scale: io.latents.scale_choice). -> the manifest."""
    model, cfg, folder = open_for(checkpoint, sources, overrides, device, one_view=True)
    specs = sources or cfg.data.train
    dataset = build_dataset(specs, cfg.data, train=False, seed=cfg.train.seed)
    return encode_dataset(model, dataset, out, specs, folder, batch=cfg.eval_batch_size,
                          num_workers=cfg.data.num_workers, logvar=logvar, chunk=chunk, progress=progress,
                          model_cfg=cfg.model, scale=scale, labels=read_labels(cfg.data.labels, dataset.source))


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


SAMPLE_BLOCK = 64  # images drawn, decoded and written at a time: any -n in flat memory
GRID_MAX = 256  # samples.png shows at most this many (16 x 16)


def block_seed(seed: int, block: int) -> int:
    """The seed of block `block` of a sample run: the run's own for the first (so -n 64 draws what a
    single draw(64, seed) does), then one no other (seed, block) pair shares."""
    return seed + block * 2**32


def sample_files(model: VAE, n: int, out_dir: str | Path, seed: int, draw=None) -> list[Path]:
    """n prior samples (draw(n, seed), default the model's best prior, priors.sampler), drawn SAMPLE_BLOCK
    at a time: out_dir/samples/sample_NNN.png each (a folder of exactly n images, as folder-based FID
    tools read them) and out_dir/samples.png, a grid of the first GRID_MAX, beside it."""
    out, draw = Path(out_dir), draw or sampler(model)
    digits = max(3, len(str(n - 1)))
    written, shown = [], []
    for block, start in enumerate(range(0, n, SAMPLE_BLOCK)):
        images = draw(min(SAMPLE_BLOCK, n - start), block_seed(seed, block))
        for i, image in enumerate(images, start):
            written.append(out / "samples" / f"sample_{i:0{digits}d}.png")
            save_grid(image[None], 1, written[-1])
        shown += list(images[: GRID_MAX - len(shown)])
    save_grid(torch.stack(shown), math.ceil(math.sqrt(len(shown))), out / "samples.png")
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
