"""The README.md model card of an exported folder: Hub front matter (library, tags, license, base
model, pipeline tag), what the model is, code that loads it and runs (tests execute every block,
THIS_FOLDER replaced by the folder), how it was trained, its latent scale and its figures."""

from __future__ import annotations

from pathlib import Path

import yaml

from imgvae.config import Config, to_dict
from imgvae.evaluation.results import Metrics
from imgvae.io.latents import describe_scale
from imgvae.models.base import VAE
from imgvae.rundir import METRICS, read_json

FOLDER = "THIS_FOLDER"  # what a card's code names the folder it describes by

USE = {
    "AutoencoderKL": '''import torch
from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained("THIS_FOLDER")
x = torch.rand(1, 3, {size}, {size}) * 2 - 1  # images on [-1, 1]
posterior = vae.encode(x).latent_dist
# The latents a second-stage model is trained on: (z - shift_factor) * scaling_factor.
z = (posterior.sample() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
x_hat = vae.decode(z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample''',
    "VQModel": '''import torch
from diffusers import VQModel

vq = VQModel.from_pretrained("THIS_FOLDER")
x = torch.rand(1, 3, {size}, {size}) * 2 - 1  # images on [-1, 1]
x_hat = vq.decode(vq.encode(x).latents).sample  # decode quantises''',
    "imgvae": '''from imgvae.io.paths import load_model

model, cfg = load_model("THIS_FOLDER")  # or: imgvae evaluate THIS_FOLDER --data PHOTOS''',
    "pipeline": '''import torch
from diffusers import DiffusionPipeline

# The pipeline's code is pipeline.py in the folder (torch and diffusers only): trust_remote_code runs it.
# With imgvae: imgvae.export.pipeline.ImgvaeFlowPipeline.from_pretrained("THIS_FOLDER") is the same.
pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER", trust_remote_code=True)
images = pipe(num_images=4, generator=torch.Generator().manual_seed(0){labels}).images  # PIL images''',
}


def front_matter(cfg: Config, kind: str, conditional: bool) -> str:
    tags = ["imgvae", "autoencoder", "vae" if kind != "VQModel" else "vq-vae"]
    if kind == "pipeline":
        tags += ["flow-matching", "latent-generation"] + (["class-conditional"] if conditional else [])
    meta = {"library_name": "diffusers" if kind != "imgvae" else "imgvae", "tags": tags, "license": "other",
            "pipeline_tag": "unconditional-image-generation" if kind == "pipeline" else "image-to-image"}
    if cfg.model.pretrained:
        meta["base_model"] = str(cfg.model.pretrained)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def metrics_text(run: Path | None) -> str:
    values = read_json(run / METRICS) if run else None
    if values is None:
        return "Not evaluated yet: `imgvae evaluate RUN` writes metrics.json."
    m = Metrics.from_dict(values)
    text = (f"`imgvae evaluate` on {m.images} held-out images ({', '.join(m.sources)}): PSNR "
            f"{m.reconstruction.psnr.mean:.2f} dB, SSIM {m.reconstruction.ssim.mean:.3f}, -ELBO "
            f"{m.likelihood.neg_elbo_bpd:.3f} bits/dim, fd_effnet of reconstructions "
            f"{m.distribution.fd_effnet_recon:.1f} ({m.images} images).")
    if m.generation is not None:
        text += "\n\nSamples against the training distribution:\n\n" + "\n".join(
            f"- {label.strip()}: {value}" for label, value in m.generation.rows(m.discrete))
    return text


def model_card(model: VAE, cfg: Config, checkpoint: Path, kind: str, stats: dict, images: int, scale: dict,
               run: Path | None, prior: dict | None = None) -> str:
    """README.md of an export; kind: AutoencoderKL, VQModel, imgvae (safetensors) or pipeline."""
    latent = "x".join(map(str, model.latent_shape))
    labels = prior.get("labels") if prior else None
    asked = f', class_labels=["{labels[0]}"] * 4' if labels else ""
    what = (f"A generator of {cfg.data.image_size}x{cfg.data.image_size} RGB images: a flow-matching prior "
            f"({prior['title']}{', conditional on ' + str(len(labels)) + ' labels' if labels else ''}) over the "
            f"latents of a {cfg.model.name} autoencoder" if kind == "pipeline" else
            f"An autoencoder ({cfg.model.name}) for {cfg.data.image_size}x{cfg.data.image_size} RGB images on [-1, 1]")
    lines = [front_matter(cfg, kind, bool(labels)), f"# {cfg.model.name} exported by imgvae", "",
             f"{what}: latent {latent}, {sum(p.numel() for p in model.parameters()):,} autoencoder parameters, from "
             f"the checkpoint `{checkpoint}`.", "", "## Use", "",
             "```python" if kind != "imgvae" else "```python",
             USE[kind].format(size=cfg.data.image_size, labels=asked), "```", ""]
    if labels:
        lines += [f"Labels: {', '.join(labels)}. `guidance_scale` sets classifier-free guidance (0: unconditional, "
                  "1: plain conditional).", ""]
    lines += ["## Training", "", f"- data: {', '.join(cfg.data.train)}; held out: {', '.join(cfg.data.eval) or 'none'}",
              "- command: `imgvae train --config config.yaml -o RUN` with the run's config.yaml (below)", "",
              "## Latent scaling", "", f"Written: {describe_scale(scale)}; `imgvae export --latent-scale "
              f"{'recompute' if scale['choice'] == 'keep' else 'keep'}` writes the other"
              + ("." if scale["own"] else " (this model has no scale of its own)."), "",
              f"Measured on {images:,} training images (the aggregate posterior's exact moments, Var = Var[mu] + "
              f"E[sigma^2]): scaling_factor {stats['scaling_factor']:.6g}, shift_factor {stats['shift_factor']:.6g}; "
              f"per channel, mean {[round(v, 4) for v in stats['channel_mean']]}, std "
              f"{[round(v, 4) for v in stats['channel_std']]}.",
              "", "## Metrics", "", metrics_text(run)]
    if cfg.loss.sigma != "fixed" or cfg.loss.likelihood != "gaussian":
        lines += ["", f"Trained with a {cfg.loss.likelihood} likelihood, decoder noise {cfg.loss.sigma}; "
                  + ("a diffusers model keeps the decoder's mean only." if kind != "imgvae" else "")]
    if prior:
        lines += ["", "## The prior", "", prior_text(prior)]
    lines += ["", "## config.yaml", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def prior_text(prior: dict) -> str:
    """What the card says of the prior in a pipeline: its network, its training, its prior section."""
    summary = prior.get("summary") or {}
    trained = (f"; {summary['epochs']} epochs, {summary['steps']:,} steps over {summary['latents']:,} latents"
               if {"epochs", "steps", "latents"} <= set(summary) else "")
    return (f"The {prior['title']} ({prior['parameters']:,} parameters) in `unet/`, trained by `imgvae train-prior` in "
            f"`{prior['folder']}`{trained}, with this prior section:\n\n```yaml\n"
            + yaml.safe_dump({"prior": prior["section"]}, sort_keys=False).rstrip() + "\n```")


def code_blocks(card: str, folder: Path) -> list[str]:
    """The python blocks of a card, with THIS_FOLDER replaced: what a test runs."""
    blocks, inside, current = [], False, []
    for line in card.splitlines():
        if line.strip() == "```python":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            blocks.append("\n".join(current).replace(FOLDER, str(folder)))
            inside = False
        elif inside:
            current.append(line)
    return blocks
