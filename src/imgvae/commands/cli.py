"""`imgvae` command line: parses arguments (parser.py) and calls the verbs (verbs.py, workflow.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from imgvae.commands.parser import build_parser, config_overrides, parse_args
from imgvae.commands.verbs import (
    encode_latents,
    evaluate_checkpoint,
    export_model,
    fit_checkpoint_prior,
    interpolate_files,
    reconstruct_files,
    sample_files,
)
from imgvae.commands.workflow import train_and_evaluate
from imgvae.config import ConfigError, load_config
from imgvae.data.cache import prepare
from imgvae.data.datasets import SkippedFile
from imgvae.data.sources import SourceError
from imgvae.evaluation.compare import compare
from imgvae.evaluation.report import format_table, write_report
from imgvae.io.checkpoint import CheckpointError
from imgvae.io.interop import FolderError
from imgvae.io.paths import load_prior, open_model
from imgvae.models.features import FeatureError
from imgvae.runtime import RunError, Stopped, is_main_process, one_line_warnings, pick_device

__all__ = ["build_parser", "main", "parse_args"]


def _train(args) -> None:
    overrides = config_overrides(args, {"seed": ("train", "seed"), "device": ("train", "device")}, flags_win=True)
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; change keys with KEY=VALUE instead of --config")
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("give the run folder once: --resume OUT (without a different -o)")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"{args.resume} is not a run folder (no config.yaml)")
        train_and_evaluate(load_config(saved, overrides), args.resume, args.logs, resume=True,
                           progress=not args.no_progress)
    else:
        if not args.out:
            raise ConfigError("imgvae train needs -o OUT (or --resume OUT)")
        train_and_evaluate(load_config(args.config, overrides), args.out, args.logs, progress=not args.no_progress)


def _prepare(args) -> None:
    cfg = load_config(args.config, args.overrides)
    specs = cfg.data.train if args.split == "train" else cfg.data.eval
    device = None if args.device == "cpu" else pick_device(args.device)
    if args.device == "auto" and (device.type == "cpu" or cfg.data.exact_decode):
        device = None
    manifest = prepare(specs, cfg.data, args.out, workers=args.workers, progress=not args.no_progress,
                       device=device)
    print(f"imgvae: {args.out}: {manifest['count']:,} images of {cfg.data.image_size}x{cfg.data.image_size} "
          f"({manifest['rows'] - manifest['count']} unreadable files skipped, listed in manifest.json)")


def _evaluate(args) -> None:
    overrides = config_overrides(args, {
        "iw_samples": ("eval", "iw_samples"), "batch_size": ("eval", "batch_size"), "limit": ("eval", "limit"),
        "fid_weights": ("eval", "fid_weights"), "lpips_weights": ("eval", "lpips_weights"),
        "sample_reference": ("eval", "sample_reference"),
        "seed": ("eval", "seed"),
    })
    metrics, path = evaluate_checkpoint(args.checkpoint, args.data, args.out, overrides, device=args.device,
                                        progress=not args.no_progress)
    print(format_table(metrics))
    print(f"imgvae: metrics written to {path}")


def _fit_prior(args) -> None:
    overrides = config_overrides(args, {"limit": ("prior", "images"), "components": ("prior", "components"),
                                  "batch_size": ("eval", "batch_size")})
    prior, path = fit_checkpoint_prior(args.checkpoint, args.data, overrides, device=args.device,
                                       progress=not args.no_progress)
    print(f"imgvae: wrote {path} ({prior.describe()})")


def _export(args) -> None:
    path = export_model(args.checkpoint, args.out, args.format, args.data, args.scaling_images, config_overrides(args),
                        device=args.device, progress=not args.no_progress)
    print(f"imgvae: wrote {path} ({', '.join(sorted(p.name for p in path.iterdir()))})")


def _encode(args) -> None:
    overrides = config_overrides(args, {"batch_size": ("eval", "batch_size")})
    manifest = encode_latents(args.checkpoint, args.out, args.data, logvar=args.logvar, overrides=overrides,
                              device=args.device, progress=not args.no_progress)
    stats = manifest["statistics"]
    print(f"imgvae: {args.out}: {manifest['count']:,} latents of shape {manifest['latent_shape']} "
          f"({manifest['rows'] - manifest['count']} unreadable files skipped); scaling_factor "
          f"{stats['scaling_factor']:.5g}, shift_factor {stats['shift_factor']:.5g}")


def _compare(args) -> None:
    overrides = config_overrides(args, {"iw_samples": ("eval", "iw_samples"), "fid_weights": ("eval", "fid_weights"),
                                  "lpips_weights": ("eval", "lpips_weights")})
    data = compare(args.models or [], args.data, args.out, image_size=args.image_size, overrides=overrides,
                   pictures=args.pictures, device=args.device, progress=not args.no_progress)
    width = max(len(m["name"]) for m in data["models"])
    for m in data["models"]:
        rec = m["metrics"]["reconstruction"]
        print(f"  {m['name']:<{width}}  PSNR {rec['psnr']['mean']:.2f} dB  SSIM {rec['ssim']['mean']:.3f}  "
              f"fd_effnet {m['metrics']['distribution']['fd_effnet_recon']:.1f}  {m['img_per_s']:,.0f} img/s")
    print(f"imgvae: wrote {Path(args.out) / 'compare.html'} and compare.json ({data['images']} images, "
          f"{data['image_size']} px)")


def _generate(args) -> None:
    model, cfg, folder = open_model(args.checkpoint, pick_device(args.device), overrides=config_overrides(args))
    if args.command == "reconstruct" and not args.images:
        raise ConfigError("imgvae reconstruct needs at least one image file")
    if args.command == "reconstruct":
        written = reconstruct_files(model, cfg.data, args.images, args.out)
    elif args.command == "sample":
        if args.n < 1:
            raise ConfigError(f"-n must be >= 1, got {args.n}")
        prior = None if args.prior == "standard" else load_prior(folder)
        if args.prior == "fitted" and prior is None:
            raise CheckpointError(f"{args.checkpoint} has no fitted prior: "
                                  f"run `imgvae fit-prior {args.checkpoint}` first")
        written = sample_files(model, args.n, args.out, args.seed, args.temperature, prior)
    else:
        if args.steps < 2:
            raise ConfigError(f"--steps must be >= 2, got {args.steps}")
        written = [interpolate_files(model, cfg.data, args.image_a, args.image_b, args.steps, args.out)]
    more = f" and {len(written) - 1} more files in {args.out}" if len(written) > 1 else ""
    print(f"imgvae: wrote {written[-1]}{more}")


COMMANDS = {
    "train": _train, "prepare": _prepare, "evaluate": _evaluate, "fit-prior": _fit_prior, "export": _export,
    "encode": _encode, "compare": _compare,
    "reconstruct": _generate, "sample": _generate, "interpolate": _generate,
    "report": lambda args: print(f"imgvae: wrote {write_report(args.run_dir)}"),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with one_line_warnings(SkippedFile):
            COMMANDS[args.command](args)
    except Stopped as e:  # by a signal, with a checkpoint to resume from
        if is_main_process():  # under torchrun every process stops; one says so
            print(f"imgvae: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, SourceError, CheckpointError, FolderError, RunError, FeatureError) as e:
        print(f"imgvae: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder, a missing file
        print(f"imgvae: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgvae: interrupted; the last finished checkpoint is kept", file=sys.stderr)
        return 130
    return 0
