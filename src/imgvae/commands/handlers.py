"""What each `imgvae` verb runs once its arguments are parsed: the library calls and the lines
printed. cli.py imports this only after parsing, so that --help and argument errors are quick."""

from __future__ import annotations

import time
from pathlib import Path

from imgvae.commands.parser import config_overrides
from imgvae.commands.verbs import (
    encode_latents,
    evaluate_checkpoint,
    interpolate_files,
    reconstruct_files,
    sample_files,
)
from imgvae.commands.workflow import train_and_evaluate
from imgvae.config import PRIOR_CONFIGS, ConfigError, load_config
from imgvae.config.resume import refuse_changed_overrides
from imgvae.data.cache import prepare
from imgvae.evaluation.compare import compare
from imgvae.evaluation.report import format_table, write_report
from imgvae.evaluation.results import Metrics
from imgvae.export import export_model
from imgvae.io.latents import describe_scale
from imgvae.io.paths import open_model
from imgvae.priors import SampleOptions, sampler
from imgvae.priors.gmm import fit_checkpoint_prior
from imgvae.priors.learned import train_prior
from imgvae.runtime import pick_device


def _train(args) -> None:
    overrides = config_overrides(args, flags_win=True)
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; change keys with KEY=VALUE instead of --config")
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("give the run folder once: --resume OUT (without a different -o)")
        saved = Path(args.resume) / "config.yaml"  # cli.refuse_missing_paths checked that it is there
        refuse_changed_overrides(load_config(saved), overrides)
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
          f"({len(manifest['skipped'])} unreadable files skipped, listed in manifest.json)")


def _evaluate(args) -> None:
    overrides = config_overrides(args)
    metrics, path = evaluate_checkpoint(args.checkpoint, args.data, args.out, overrides, device=args.device,
                                        progress=not args.no_progress)
    print(format_table(metrics))
    print(f"imgvae: metrics written to {path}" if path else "imgvae: metrics not written (this model has no run "
          "folder): pass -o FILE to keep them")


def _fit_prior(args) -> None:
    overrides = config_overrides(args)
    prior, path = fit_checkpoint_prior(args.checkpoint, args.data, overrides, device=args.device,
                                       progress=not args.no_progress)
    print(f"imgvae: wrote {path} ({prior.describe()})")


def _export(args) -> None:
    path = export_model(args.checkpoint, args.out, args.format, args.data, args.scaling_images, config_overrides(args),
                        device=args.device, scale=args.latent_scale, prior=args.prior, prior_run=args.prior_run,
                        progress=not args.no_progress)
    print(f"imgvae: wrote {path} ({', '.join(sorted(p.name for p in path.iterdir()))})")


def _encode(args) -> None:
    overrides = config_overrides(args)
    manifest = encode_latents(args.checkpoint, args.out, args.data, logvar=args.logvar, overrides=overrides,
                              device=args.device, scale=args.latent_scale, progress=not args.no_progress)
    print(f"imgvae: {args.out}: {manifest['count']:,} latents of shape {manifest['latent_shape']} "
          f"({len(manifest['skipped'])} unreadable files left out, listed in manifest.json); "
          f"{describe_scale(manifest['latent_scale'])}")


def _compare(args) -> None:
    overrides = config_overrides(args)
    data = compare(args.models or [], args.data, args.out, image_size=args.image_size, overrides=overrides,
                   pictures=args.pictures, device=args.device, progress=not args.no_progress)
    width = max(len(m["name"]) for m in data["models"])
    for m in data["models"]:
        metrics = Metrics.from_dict(m["metrics"])
        print(f"  {m['name']:<{width}}  PSNR {metrics.reconstruction.psnr.mean:.2f} dB  SSIM "
              f"{metrics.reconstruction.ssim.mean:.3f}  fd_effnet {metrics.distribution.fd_effnet_recon:.1f}  "
              f"{m['img_per_s']:,.0f} img/s")
    print(f"imgvae: wrote {Path(args.out) / 'compare.html'} and compare.json ({data['images']} images, "
          f"{data['image_size']} px)")


def _train_prior(args) -> None:
    summary = train_prior(args.checkpoint, args.out, args.data, config_overrides(args), resume=args.resume,
                          device=args.device, progress=not args.no_progress)
    if summary:  # rank 0
        print(f"imgvae: {PRIOR_CONFIGS[summary['kind']].title} trained, {summary['steps']} steps in "
              f"{summary['seconds_this_run']:.0f} s ({summary['skipped_steps']} non-finite skipped); checkpoint "
              f"{Path(summary['folder']) / summary['checkpoint']}")


def _generate(args) -> None:
    model, cfg, folder = open_model(args.checkpoint, pick_device(args.device), overrides=config_overrides(args))
    if args.command == "reconstruct" and not args.images:
        raise ConfigError("imgvae reconstruct needs at least one image file")
    if args.command == "reconstruct":
        written = reconstruct_files(model, cfg.data, args.images, args.out)
    elif args.command == "sample":
        if args.n < 1:
            raise ConfigError(f"-n must be >= 1, got {args.n}")
        sets = [(name,) for name in args.label or []]
        sets += [tuple(x.strip() for x in s.split(",") if x.strip()) for s in args.labels or []]
        options = SampleOptions(args.temperature, args.steps, args.solver, args.prior_run, tuple(sets) or None,
                                args.label_distribution, args.guidance)
        draw = sampler(model, args.prior, options)
        started = time.perf_counter()
        written = sample_files(model, args.n, args.out, args.seed, draw=draw)
        print(f"imgvae: {args.n} samples from the {draw.title}, {args.n / (time.perf_counter() - started):.1f} "
              "samples/s (writing included)")
    else:
        if args.steps < 2:
            raise ConfigError(f"--steps must be >= 2, got {args.steps}")
        written = [interpolate_files(model, cfg.data, args.image_a, args.image_b, args.steps, args.out)]
    more = f" and {len(written) - 1} more files in {args.out}" if len(written) > 1 else ""
    print(f"imgvae: wrote {written[-1]}{more}")


COMMANDS = {
    "train": _train, "prepare": _prepare, "evaluate": _evaluate, "fit-prior": _fit_prior, "export": _export,
    "encode": _encode, "compare": _compare, "train-prior": _train_prior,
    "reconstruct": _generate, "sample": _generate, "interpolate": _generate,
    "report": lambda args: print(f"imgvae: wrote {write_report(args.run_dir)}"),
}
