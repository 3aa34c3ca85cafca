"""Representation alignment at equal CPU budget, on the embedded photos: {plain, aligned (loss.align,
VA-VAE's loss)} autoencoder x {plain, aligned (prior.align, REPA)} flow prior, each prior over seeds
and scored at several cumulative training minutes (a curve: the run resumed between points). Prints
one table: the autoencoder's PSNR, and per prior and point its steps, minutes, fd_effnet, KID,
precision, recall, memorised share, with the reconstruction floor; then the mean and spread over
seeds at each point, and the alignment's cost in training speed (img/s).

    python bench/alignment.py                                     # sharp, 2 seeds, 2 4 8 minutes
    python bench/alignment.py --points 2 5 10 20 --seeds 0 1 2    # the full curve
    python bench/alignment.py --reuse runs/steer/sharp            # a plain sharp run already trained
    python bench/alignment.py --unit epochs --points 1 2 3        # priors at equal steps, not minutes

Priors at equal steps (--unit epochs) compare alike on a shared, noisy machine; the minutes and
img/s each took are printed beside them. The autoencoders train for --minutes each: run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

from imgvae.commands.verbs import evaluate_checkpoint
from imgvae.commands.workflow import train_and_evaluate
from imgvae.config import load_config
from imgvae.data.datasets import build_dataset
from imgvae.evaluation.generation import generation_metrics
from imgvae.io.paths import load_model
from imgvae.priors import SampleOptions, sampler
from imgvae.priors.learned import train_prior

PRIOR = ["prior.width=32", "prior.batch_size=32", "prior.lr=2e-3", "prior.ema=0.999", "prior.epochs=100000"]


def train_autoencoder(run: Path, args, align: float) -> None:
    overrides = ["data.train=[embedded:train]", "data.eval=[embedded:eval]", "data.image_size=64",
                 "data.crop=random", "data.views_per_image=1024", "train.epochs=1000",
                 f"train.time_limit={args.minutes}", "eval.after_training=false", "train.log_every=50",
                 "train.ckpt_every=0", "train.seed=0", "prior.after_training=false", f"loss.align={align}"]
    train_and_evaluate(load_config(args.model, overrides), run, progress=False)


def psnr(run: Path) -> float:
    metrics, _ = evaluate_checkpoint(run, ["embedded:eval"], run / "eval_metrics.json",
                                     ["eval.iw_samples=1", "eval.generation_images=0"], progress=False)
    return metrics.reconstruction.psnr.mean


def curve(run: Path, prior: Path, keys: list[str], args) -> list[dict]:
    """Train the prior to each of args.points cumulative minutes or epochs (resuming between them),
    scoring each."""
    points, done, seconds, seen = [], 0.0, 0.0, 0
    for point in args.points:
        step = ([f"prior.time_limit={point - done}"] if args.unit == "minutes"
                else [f"prior.epochs={point:g}", "prior.time_limit=0"])
        if not (prior / "summary.json").is_file():
            train_prior(run, prior, overrides=[*PRIOR, *keys, *step], progress=False)
        else:
            train_prior(run, prior, overrides=step, resume=True, progress=False)
        done = point
        summary = json.loads((prior / "summary.json").read_text())
        seconds, seen = seconds + summary["seconds_this_run"], seen + summary["images_seen_this_run"]
        points.append({"minutes": seconds / 60, "steps": summary["steps"], "img_s": seen / seconds,
                       **score(run, prior, args)})
        print(json.dumps({str(prior): points[-1]}), flush=True)
    return points


def score(run: Path, prior: Path, args) -> dict:
    model, cfg = load_model(run)
    views = build_dataset(cfg.data.train, cfg.data, train=True, seed=cfg.train.seed)
    draw = sampler(model, "flow", SampleOptions(prior_run=prior, steps=args.steps))
    result = generation_metrics(model, views, {"flow": draw}, images=args.images, batch_size=64, seed=0)
    return {**result.priors["flow"].to_dict(), "floor": result.floor.fd_effnet}


def table(results: dict) -> str:
    lines = ["| autoencoder (PSNR dB) | prior | seed | minutes | steps | img/s | fd_effnet | KID | precision | "
             "recall | memorised | floor |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ae, r in results.items():
        for (prior, seed), points in r["priors"].items():
            for p in points:
                lines.append(f"| {ae} ({r['psnr']:.2f}) | {prior} | {seed} | {p['minutes']:.1f} | {p['steps']} | "
                             f"{p['img_s']:.0f} | {p['fd_effnet']:.1f} | {p['kid_effnet']:.4f} | "
                             f"{p['precision']:.2f} | {p['recall']:.2f} | {p['memorised']:.0%} | {p['floor']:.1f} |")
    lines += ["", "| autoencoder | prior | minutes | fd_effnet, mean ± spread over seeds |", "|---|---|---:|---|"]
    for ae, r in results.items():
        for prior in dict.fromkeys(p for p, _ in r["priors"]):
            runs = [points for (name, _), points in r["priors"].items() if name == prior]
            for i in range(len(runs[0])):
                values = [points[i]["fd_effnet"] for points in runs]
                minutes = statistics.mean(points[i]["minutes"] for points in runs)
                spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
                lines.append(f"| {ae} | {prior} | {minutes:.1f} | {statistics.mean(values):.1f} ± {spread:.1f} "
                             f"({len(values)} seeds) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sharp", help="preset of the autoencoders")
    parser.add_argument("--minutes", type=float, default=5.0, help="autoencoder training, each")
    parser.add_argument("--ae-align", type=float, default=1.0, help="loss.align of the aligned autoencoder")
    parser.add_argument("--prior-align", type=float, default=0.5, help="prior.align of the aligned prior")
    parser.add_argument("--points", type=float, nargs="+", default=[2, 4, 8],
                        help="cumulative prior minutes (or epochs) scored")
    parser.add_argument("--unit", choices=["minutes", "epochs"], default="minutes", help="of --points")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="prior seeds (on the plain autoencoder)")
    parser.add_argument("--aligned-seeds", type=int, nargs="*", default=[0], help="prior seeds on the aligned one")
    parser.add_argument("--images", type=int, default=512, help="training views the samples are scored against")
    parser.add_argument("--steps", type=int, default=32, help="ODE steps of the samples scored")
    parser.add_argument("--reuse", help="a plain autoencoder run to use instead of training one")
    parser.add_argument("--out", default="runs/align")
    args = parser.parse_args()
    out, results = Path(args.out), {}
    for ae, align, seeds in (("plain", 0.0, args.seeds), ("aligned", args.ae_align, args.aligned_seeds)):
        run = Path(args.reuse) if ae == "plain" and args.reuse else out / f"ae-{ae}"
        if not (run / "summary.json").is_file():
            train_autoencoder(run, args, align)
        results[ae], shared = {"psnr": psnr(run), "priors": {}}, None
        for prior, weight in (("REPA", args.prior_align), ("plain", 0.0)):  # REPA's latents hold features too
            for seed in seeds:
                folder = out / f"prior-{ae}-ae-{prior}-{seed}"
                if shared is not None and not (folder / "latents").exists():  # encoded once per autoencoder
                    shutil.copytree(shared, folder / "latents", copy_function=os.link)
                keys = [f"prior.align={weight}", f"prior.seed={seed}"]
                results[ae]["priors"][prior, seed] = curve(run, folder, keys, args)
                shared = folder / "latents"
    print(table(results))
    (out / "alignment.json").write_text(json.dumps({ae: {"psnr": r["psnr"], "priors": {
        f"{p}, seed {s}": v for (p, s), v in r["priors"].items()}} for ae, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
