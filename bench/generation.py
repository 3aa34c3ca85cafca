"""Generation at equal CPU budget: autoencoders trained on the embedded photos, each with
its priors (its own: N(0, I), or uniform codes for a discrete latent; a 10-Gaussian mixture and
the flow prior for a continuous latent; the token prior for a discrete one), scored by one table
against the training distribution: fd_effnet of samples, precision, recall, memorised share;
the reconstruction floor; real held-out crops of the same photos (what a perfect prior scores);
prior training time; sampling img/s by step count. And the side-by-side picture.

    python bench/generation.py                                  # seed and sharp, 5 + 4 minutes each
    python bench/generation.py --models sharp --backbones transformer unet --prior-minutes 6
    python bench/generation.py --models sharp --backbones transformer transformer+prior.width=128
    python bench/generation.py --models kl-f8 vq-f8 fsq-f8      # continuous and discrete latents
    python bench/generation.py --score-only                     # re-score the runs in --out
    python bench/generation.py --models sharp --labels --guidance 0 1 2 4   # + a conditional flow prior
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from imgvae.commands.workflow import train_and_evaluate
from imgvae.config import load_config
from imgvae.data.datasets import build_dataset
from imgvae.evaluation.generation import generation_metrics
from imgvae.io.paths import load_model
from imgvae.io.pictures import save_labelled_rows
from imgvae.priors import SampleOptions, sampler
from imgvae.priors.gmm import fit_checkpoint_prior
from imgvae.priors.learned import train_prior

MODELS = {"seed": "demo", "sharp": "sharp", "kl-f4": "kl-f4", "kl-f8": "kl-f8", "vq-f4": "vq-f4", "vq-f8": "vq-f8",
          "fsq-f8": "fsq-f8"}  # name -> preset
DISCRETE = {"vq-f4", "vq-f8", "fsq-f8"}  # their learned prior is the token prior; no mixture


def train_model(name: str, args, run: Path) -> None:
    overrides = ["data.train=[embedded:train]", "data.eval=[embedded:eval]", "data.image_size=64",
                 "data.crop=random", "data.views_per_image=1024", "train.epochs=1000",
                 f"train.time_limit={args.minutes}", "eval.after_training=false", "train.log_every=50",
                 "train.ckpt_every=0", f"train.seed={args.seed}", "prior.after_training=false"]
    train_and_evaluate(load_config(MODELS[name], overrides), run, progress=False)


def learned(name: str, args) -> dict[str, tuple[str, Path, list[str]]]:
    """The learned priors of a model's run: {label: (kind, prior run folder, its own prior keys)}; with
    --labels, each also conditional on the embedded photos' names (data.labels=folders)."""
    run = Path(args.out) / name
    if name in DISCRETE:
        priors = {"tokens": ("tokens", run / "prior-tokens", [])}
    else:
        priors = {}
        for spec in args.backbones:  # BACKBONE or BACKBONE+prior.key=value+...
            backbone, *keys = spec.split("+")
            priors[f"flow ({spec})"] = ("flow", run / f"prior-flow-{spec.replace('+', '_')}",
                                        [f"prior.backbone={backbone}", *keys])
    if args.labels:
        priors |= {f"{label}, labels": (kind, folder.with_name(folder.name + "-labels"), [*keys, "data.labels=folders"])
                   for label, (kind, folder, keys) in priors.items()}
    return priors


def make_priors(name: str, run: Path, args) -> dict[str, float]:
    """gmm-10 (continuous latents) and the learned priors -> {prior, as samplers_of names it: training seconds}."""
    seconds = {}
    if name not in DISCRETE:
        started = time.time()
        fit_checkpoint_prior(run, overrides=["prior.components=10", "prior.images=10000"], progress=False)
        seconds["gmm-10"] = time.time() - started
    for label, (_, out, keys) in learned(name, args).items():
        if not (out / "summary.json").is_file():
            train_prior(run, out, overrides=[f"prior.width={args.width}", f"prior.depth={args.depth}", *keys,
                                             f"prior.epochs={args.prior_epochs}",
                                             f"prior.time_limit={args.prior_minutes}", "prior.ema=0.999"],
                        progress=False)
        seconds[label] = json.loads((out / "summary.json").read_text())["seconds_this_run"]
    return seconds


def samplers_of(name: str, run: Path, model, args, steps: int | None = None) -> dict:
    own = "uniform codes" if name in DISCRETE else "N(0, I)"
    draws = {own: sampler(model, "standard")}
    if name not in DISCRETE:
        draws["gmm-10"] = sampler(model, "gmm")
    for label, (kind, out, keys) in learned(name, args).items():
        for w in (args.guidance if "data.labels=folders" in keys else [None]):
            options = SampleOptions(prior_run=out, steps=steps or args.steps[-1], guidance=w)
            draws[label if w is None else f"{label}, W={w:g}"] = sampler(model, kind, options)
    return draws


def sampling_speed(name: str, run: Path, model, args) -> dict:
    """Learned-prior samples per second (Heun for a flow) by step count, decoding included."""
    speeds = {}
    for steps in args.steps:
        for label, draw in samplers_of(name, run, model, args, steps).items():
            if label in learned(name, args):
                started = time.perf_counter()
                draw(64, 0)
                speeds[f"{label}, {steps} steps"] = 64 / (time.perf_counter() - started)
    return speeds


def score(name: str, run: Path, args) -> dict:
    model, cfg = load_model(run)
    train_views = build_dataset(cfg.data.train, cfg.data, train=True, seed=cfg.train.seed)
    # Held-out crops of the same photos: other random crops (another seed), never trained on.
    held_out = build_dataset(cfg.data.train, cfg.data, train=True, seed=cfg.train.seed + 12345)
    held_out.set_epoch(10_000)
    draws = samplers_of(name, run, model, args)
    scores = generation_metrics(model, train_views, draws, images=args.images, batch_size=64, seed=args.seed,
                                held_out=held_out).to_dict()
    scores["speed"] = sampling_speed(name, run, model, args)
    scores["rows"] = [(f"{name}, {prior}", draw(8, 1)) for prior, draw in draws.items()]
    for prior, draw in draws.items():  # a conditional prior: a row per label, at each guidance
        scores["rows"] += [(f"{name}, {prior}: {label}", draw(8, 1, ((label,),))) for label in draw.labels]
    return scores


def table(results: dict, seconds: dict) -> str:
    lines = ["| model | samples from | fd_effnet (n) | KID | precision | recall | memorised | label score (ceiling) | "
             "prior training s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows = [(p, s, seconds[name].get(p.split(", W=")[0])) for p, s in r["priors"].items()]
        rows += [("reconstructions (floor)", r["floor"], None), ("real held-out crops", r["held_out"], None)]
        for prior, s, sec in rows:
            label = (f"{s['label_metric']} {s['label_score']:.2f} ({s['label_ceiling']:.2f})"
                     if s.get("label_score") is not None else "")
            lines.append(f"| {name} | {prior} | {s['fd_effnet']:.1f} ({s['images']}) | {s['kid_effnet']:.4f} | "
                         f"{s['precision']:.2f} | {s['recall']:.2f} | "
                         f"{s['memorised']:.0%} | {label} | {'' if sec is None else f'{sec:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["seed", "sharp"], choices=sorted(MODELS))
    parser.add_argument("--backbones", nargs="+", default=["auto"],
                        help="flow backbones to train (auto, transformer, unet, mlp), each with its own prior keys "
                        "if any: transformer+prior.width=128+prior.patch_size=4")
    parser.add_argument("--minutes", type=float, default=5.0, help="autoencoder training per model")
    parser.add_argument("--prior-minutes", type=float, default=4.0, help="flow prior training per backbone")
    parser.add_argument("--prior-epochs", type=int, default=100_000,
                        help="prior epochs, whichever of them and --prior-minutes ends first (equal steps)")
    parser.add_argument("--width", default="auto", help="prior.width")
    parser.add_argument("--depth", default="auto", help="prior.depth")
    parser.add_argument("--images", type=int, default=512, help="training views the samples are scored against")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32], help="ODE step counts timed")
    parser.add_argument("--labels", action="store_true",
                        help="also train each learned prior conditional on the photos' names (data.labels=folders)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                        help="classifier-free guidance the conditional priors are scored at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/generation")
    parser.add_argument("--picture", default="docs/generation_samples.png")
    parser.add_argument("--score-only", action="store_true")
    args = parser.parse_args()
    results, seconds, rows = {}, {}, []
    for name in args.models:
        run = Path(args.out) / name
        if not args.score_only and not (run / "summary.json").is_file():
            train_model(name, args, run)
        seconds[name] = make_priors(name, run, args) if not args.score_only else json.loads(
            (run / "prior_seconds.json").read_text())
        (run / "prior_seconds.json").write_text(json.dumps(seconds[name]))
        results[name] = score(name, run, args)
        rows += results[name].pop("rows")
        print(json.dumps({name: {k: v for k, v in results[name].items()}}, indent=1), flush=True)
    save_labelled_rows(rows, Path(args.picture))
    print(table(results, seconds))
    for name, r in results.items():
        print(f"{name} sampling img/s:", ", ".join(f"{k} {v:.1f}" for k, v in r["speed"].items()))
    Path(args.out, "generation.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
