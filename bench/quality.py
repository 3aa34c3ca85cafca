"""Quality at equal wall-clock: train each preset for the same budget on the same
data, evaluate on held-out images never seen in training, print one table.

Default data: the embedded photos' random crops (6 photos for training, 2 others
held out), as `make demo`, with 1,024 crops per photo per epoch so that the
per-epoch learning-rate decay of every preset sees comparable epochs. The held-out
photos are other scenes, so samples are scored against crops of the training photos
(the distribution the models learn), as FID is scored against training images.

    python bench/quality.py                         # 6 presets x 10 minutes on this machine
    python bench/quality.py --minutes 3 --presets demo resnet
    python bench/quality.py --epochs 1 --presets kl-f4 kl-f8   # equal steps (192 per epoch), not equal time
    python bench/quality.py --evaluate-only       # re-score the runs in --out (e.g. after a new metric)
    python bench/quality.py --train /data/coco/train2017.zip --eval /data/coco/val2017.zip --minutes 60
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from imgvae.commands.verbs import evaluate_checkpoint
from imgvae.commands.workflow import train_and_evaluate
from imgvae.config import load_config
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import normalize
from imgvae.io.paths import load_model
from imgvae.io.pictures import save_labelled_rows
from imgvae.models.generate import reconstruct
from imgvae.priors import gmm, standard
from imgvae.priors.gmm import fit_checkpoint_prior

# demo = the seed model and recipe; NAME+key=value+... adds overrides to a preset.
PRESETS = ["demo", "demo+loss.sigma=scalar", "resnet", "kl-f8", "kl-f4", "sharp"]


def run_dir(out: Path, preset: str) -> Path:
    return out / preset.replace("+", "_")


def run_preset(preset: str, args, out: Path) -> dict:
    overrides = [
        f"data.train=[{args.train}]", f"data.eval=[{args.eval}]", "data.image_size=64",
        f"train.epochs={args.epochs or 1000}", f"train.time_limit={0 if args.epochs else args.minutes}",
        "eval.after_training=false", f"train.seed={args.seed}",
        "train.log_every=20", "train.ckpt_every=0", f"prior.after_training={args.prior_images > 0}",
        f"prior.images={args.prior_images}", f"prior.components={args.prior_components}",
    ]
    if args.train == "embedded:train":
        overrides += ["data.crop=random", "data.views_per_image=1024", f"data.eval_views_per_image={args.eval_views}"]
    name, *extra = preset.split("+")
    cfg = load_config(name, overrides + extra)
    train_and_evaluate(cfg, out, progress=False)
    return score(preset, args, out)


def score(preset: str, args, out: Path) -> dict:
    """The table row of a finished run: its summary, and `imgvae evaluate` of its final weights."""
    summary = json.loads((out / "summary.json").read_text())
    settings = {"seed": args.seed, "iw_samples": args.iw_samples, "batch_size": 64,
                "sample_reference": sample_reference(args) or []}
    metrics, _ = evaluate_checkpoint(out, overrides={"eval": settings}, progress=False)
    return {
        "preset": preset, "params": summary["parameters"], "steps": summary["steps"],
        "img_per_s": summary["images_seen_this_run"] / summary["seconds_this_run"],
        "psnr": metrics["reconstruction"]["psnr"]["mean"], "ssim": metrics["reconstruction"]["ssim"]["mean"],
        "bpd": metrics["likelihood"]["neg_elbo_bpd"], "iw_bpd": metrics["likelihood"]["neg_iw_bpd"],
        "fd_recon": metrics["distribution"]["fd_effnet_recon"],
        "fd_samples": metrics["distribution"]["fd_effnet_samples"],
        "fd_samples_fitted": metrics["distribution"].get("fd_effnet_samples_fitted"),
        "active": f"{metrics['latent']['active_units']}/{metrics['latent']['dims']}", "images": metrics["images"],
        "reference_images": metrics["samples_reference"]["images"],
        "codebook_usage": metrics.get("codebook", {}).get("usage"),
        "bits_per_image": metrics.get("codebook", {}).get("bits_per_image"),
    }


def sample_reference(args) -> list[str] | None:
    """What samples are scored against: the embedded held-out photos are other scenes than
    the training photos (real training crops score 376 against them, worse than any
    model's samples), so there the training photos' crops; otherwise the held-out set."""
    if args.sample_reference == "held-out" or (args.sample_reference is None and args.train != "embedded:train"):
        return None
    return [args.sample_reference or args.train]


def pictures(presets: list[str], out: Path, docs: Path, n: int = 8) -> None:
    """Held-out reconstructions and samples (from N(0, I) and from the fitted prior) of
    every preset's final weights, side by side."""
    runs = [run_dir(out, preset) for preset in presets]
    data = load_config(runs[0] / "config.yaml").data
    held_out = build_dataset(data.eval, data, train=False, seed=0)
    step = max(len(held_out) // n, 1)
    truth = torch.stack([held_out[i * step][0] for i in range(n)])
    recon_rows, sample_rows = [("held-out crops", truth.float() / 255)], []
    for preset, run in zip(presets, runs):
        model, _ = load_model(run, "cpu")
        recon_rows.append((preset, reconstruct(model, normalize(truth))))
        sample_rows.append((f"{preset}, N(0, I)", standard.sample(model, n, seed=0)))
        prior = gmm.load_prior(run)
        if prior is not None:
            sample_rows.append((f"{preset}, fitted prior", gmm.sample(model, n, 0, prior)))
    save_labelled_rows(recon_rows, docs / "quality_reconstructions.png")
    save_labelled_rows(sample_rows, docs / "quality_samples.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget per preset")
    parser.add_argument("--epochs", type=int, help="train this many epochs instead (equal steps; a noisy machine's "
                        "minutes are unequal)")
    parser.add_argument("--train", default="embedded:train")
    parser.add_argument("--eval", default="embedded:eval")
    parser.add_argument("--eval-views", type=int, default=64, help="crops per held-out embedded photo")
    parser.add_argument("--iw-samples", type=int, default=8)
    parser.add_argument("--prior-images", type=int, default=10_000,
                        help="fit a prior on this many training latents after training, every preset (0: off)")
    parser.add_argument("--prior-components", type=int, default=10,
                        help="Gaussians in that prior, every preset (default 10, as Ghosh et al. 2020; "
                        "1: one Gaussian)")
    parser.add_argument("--sample-reference", metavar="SOURCE",
                        help="real images the samples are scored against: a source, or 'held-out' (default: the "
                        "training photos' crops when training on the embedded photos, else the held-out set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="run folders (kept: grids, report.html)")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the side-by-side pictures go")
    parser.add_argument("--pictures-only", action="store_true", help="redraw the pictures from the runs in --out")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="no training: fit each run's prior again (--prior-images) and re-score the runs in --out")
    args = parser.parse_args()
    if args.pictures_only:
        return pictures(args.presets, args.out, args.docs)
    rows = []
    for preset in args.presets:
        out = run_dir(args.out, preset)
        if args.evaluate_only:
            if args.prior_images:
                prior = {"images": args.prior_images, "components": args.prior_components}
                fit_checkpoint_prior(out, overrides={"prior": prior, "eval": {"batch_size": 64}}, progress=False)
            rows.append(score(preset, args, out))
        else:
            shutil.rmtree(out, ignore_errors=True)
            rows.append(run_preset(preset, args, out))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2))
    pictures(args.presets, args.out, args.docs)
    seed_psnr = next((r["psnr"] for r in rows if r["preset"] == "demo"), None)
    train_cfg = load_config(run_dir(args.out, args.presets[0]) / "config.yaml").train
    budget = f"{train_cfg.time_limit:g} min" if train_cfg.time_limit else f"{train_cfg.epochs} epochs"
    reference = sample_reference(args)
    print(f"\n{budget} of training per preset; held-out: {rows[0]['images']} crops of {args.eval}; samples "
          f"scored against {rows[0]['reference_images']} "
          f"{'crops of ' + reference[0] if reference else 'held-out images'}")
    print("| preset | params | img/s | steps | PSNR dB | SSIM | -ELBO bpd | IW bpd | fd_effnet recon "
          "| fd_effnet samples N(0, I) | fd_effnet samples fitted prior | active units | codebook usage "
          "| bits/image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gain = f" ({r['psnr'] - seed_psnr:+.1f})" if seed_psnr is not None and r["preset"] != "demo" else ""
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['img_per_s']:.1f} | {r['steps']} "
              f"| {r['psnr']:.2f}{gain} | "
              f"{r['ssim']:.3f} | {r['bpd']:.3f} | {r['iw_bpd']:.3f} | {r['fd_recon']:.1f} | {r['fd_samples']:.1f} | "
              f"{'—' if r['fd_samples_fitted'] is None else format(r['fd_samples_fitted'], '.1f')} | {r['active']} | "
              f"{'—' if r.get('codebook_usage') is None else format(r['codebook_usage'], '.1%')} | "
              f"{'—' if r.get('bits_per_image') is None else format(r['bits_per_image'], '.0f')} |")


if __name__ == "__main__":
    main()
