"""What `imgvae train` runs: training, then, as the config's `prior` and `eval` sections
say, a fitted prior, the evaluation of the final weights, and the report."""

from __future__ import annotations

from pathlib import Path

import yaml

from imgvae import rundir
from imgvae.commands.verbs import evaluate_checkpoint
from imgvae.config import Config, to_dict
from imgvae.config.resume import flat
from imgvae.evaluation.report import format_table, write_report
from imgvae.evaluation.results import Metrics
from imgvae.priors import check_after_training, kind_of
from imgvae.runtime import is_main_process
from imgvae.train.engine import checked_config, train


def tensorboard_hparams(cfg: Config, out: Path, summary: dict, metrics: Metrics | None) -> None:
    """The run's config as text and hyperparameters in TensorBoard, with its final metrics."""
    from torch.utils.tensorboard import SummaryWriter

    values = flat(to_dict(cfg))
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
    final = {f"final/{k.replace('/', '_')}": v for k, v in summary["final"].items()}
    if metrics is not None:
        final |= {f"final/{name}": value for name, value in metrics.summary().items()}
    with SummaryWriter(str(rundir.resolved(out, summary["logs"]))) as writer:
        writer.add_text("config", "<pre>" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "</pre>")
        writer.add_hparams(hparams, final, run_name=".")


def train_and_evaluate(cfg: Config, out_dir: str | Path, log_dir: str | Path | None = None, resume: bool = False,
                       progress: bool = True) -> dict:
    """train(...), then (rank 0 only) prior.after_training, eval.after_training and
    report.html. -> the run summary ({} on other ranks)."""
    check_after_training(checked_config(cfg, resume, out_dir))
    summary = train(cfg, out_dir, log_dir, resume=resume, progress=progress)
    if not is_main_process():
        return summary
    out, device = Path(out_dir), summary["device"]
    checkpoints = out / rundir.CHECKPOINTS
    if cfg.prior.after_training:
        print(f"imgvae: {kind_of(cfg.prior.kind).make(checkpoints, device=device, progress=progress)}")
    metrics = None
    if cfg.eval.after_training and cfg.data.eval:
        metrics, path = evaluate_checkpoint(checkpoints, device=device, progress=progress)
        print(f"imgvae: evaluation of the final checkpoint ({path}):\n{format_table(metrics)}")
    tensorboard_hparams(cfg, out, summary, metrics)
    print(f"imgvae: report {write_report(out)}")
    print(f"imgvae: done, {summary['epochs']} epochs, {summary['steps']} steps ({summary['skipped_steps']} "
          f"non-finite skipped); {summary['skipped_files']} unreadable files skipped; checkpoint "
          f"{out / summary['checkpoint']}, grids in {out / rundir.GRIDS}, TensorBoard logs in "
          f"{rundir.resolved(out, summary['logs'])}")
    return summary

