"""What `imgvae train` runs: training, then, as the config's `prior` and `eval` sections
say, a fitted prior, the evaluation of the final weights, and the report."""

from __future__ import annotations

from pathlib import Path

import yaml

from imgvae import rundir
from imgvae.commands.verbs import evaluate_checkpoint, fit_checkpoint_prior, train_prior
from imgvae.config import Config, to_dict
from imgvae.evaluation.report import format_table, write_report
from imgvae.io.paths import load_model
from imgvae.io.pictures import save_grid
from imgvae.models.generate import sample
from imgvae.runtime import is_main_process
from imgvae.train.engine import flat, train


def tensorboard_hparams(cfg: Config, summary: dict, metrics: dict | None) -> None:
    """The run's config as text and hyperparameters in TensorBoard, with its final metrics."""
    from torch.utils.tensorboard import SummaryWriter

    values = flat(to_dict(cfg))
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
    final = {f"final/{k.replace('/', '_')}": v for k, v in summary["final"].items()}
    if metrics is not None:
        final |= {"final/psnr": metrics["reconstruction"]["psnr"]["mean"],
                  "final/ssim": metrics["reconstruction"]["ssim"]["mean"],
                  "final/bits_per_dim": metrics["likelihood"]["neg_elbo_bpd"],
                  "final/fd_effnet_recon": metrics["distribution"]["fd_effnet_recon"]}
        if "codebook" in metrics:
            final |= {"final/codebook_usage": metrics["codebook"]["usage"],
                      "final/bits_per_image": metrics["codebook"]["bits_per_image"]}
    with SummaryWriter(summary["logs"]) as writer:
        writer.add_text("config", "<pre>" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "</pre>")
        writer.add_hparams(hparams, final, run_name=".")


def train_and_evaluate(cfg: Config, out_dir: str | Path, log_dir: str | Path | None = None, resume: bool = False,
                       progress: bool = True) -> dict:
    """train(...), then (rank 0 only) prior.after_training, eval.after_training and
    report.html. -> the run summary ({} on other ranks)."""
    summary = train(cfg, out_dir, log_dir, resume=resume, progress=progress)
    if not is_main_process():
        return summary
    out, device = Path(out_dir), summary["device"]
    checkpoints = out / rundir.CHECKPOINTS
    if cfg.prior.after_training and cfg.prior.kind in rundir.LEARNED_PRIOR_GRID:
        learned = train_prior(checkpoints, device=device, progress=progress)
        print(f"imgvae: {cfg.prior.kind} prior trained ({learned['steps']} steps, {learned['checkpoint']}); its "
              f"samples: {out / rundir.GRIDS / rundir.LEARNED_PRIOR_GRID[cfg.prior.kind]}")
    elif cfg.prior.after_training:
        prior, path = fit_checkpoint_prior(checkpoints, device=device, progress=progress)
        model, _ = load_model(checkpoints, device)
        grid = out / rundir.GRIDS / rundir.FITTED_PRIOR_GRID
        save_grid(sample(model, cfg.eval.grid_size**2, cfg.train.seed, prior=prior), cfg.eval.grid_size, grid)
        print(f"imgvae: fitted {prior.describe()} ({path}); its samples: {grid}")
    metrics = None
    if cfg.eval.after_training and cfg.data.eval:
        metrics, path = evaluate_checkpoint(checkpoints, device=device, progress=progress)
        print(f"imgvae: evaluation of the final checkpoint ({path}):\n{format_table(metrics)}")
    tensorboard_hparams(cfg, summary, metrics)
    print(f"imgvae: report {write_report(out)}")
    print(f"imgvae: done, {summary['epochs']} epochs, {summary['steps']} steps ({summary['skipped_steps']} "
          f"non-finite skipped); {summary['skipped_files']} unreadable files skipped; checkpoint "
          f"{summary['checkpoint']}, grids in {out / rundir.GRIDS}, TensorBoard logs in {summary['logs']}")
    return summary

