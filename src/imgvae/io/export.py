"""`imgvae export`: a trained model as a folder other tools read. --format diffusers writes a
diffusers AutoencoderKL folder (`AutoencoderKL.from_pretrained(DIR)` loads it) for
the KL models (autoencoder-kl, kl-f4, kl-f8), with the latent scale kept or measured; --format
safetensors writes the weights and the imgvae config of any model (the seed's flat 128-d latent
fits no diffusers class). Both add a README.md model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from imgvae.config import Config, ConfigError, to_dict
from imgvae.io.checkpoint import save_weights
from imgvae.io.interop import diffusers_network, vq_model_network
from imgvae.io.latents import describe_scale
from imgvae.io.paths import EXPORT_FORMAT, run_dir_of
from imgvae.models.autoencoder_kl import AutoencoderKL, KLAutoencoder
from imgvae.models.base import VAE
from imgvae.models.quantized import QuantizedAutoencoder
from imgvae.rundir import METRICS, read_json, write_text_atomic

FORMATS = ("diffusers", "safetensors")


def export_format(model: VAE, cfg: Config, fmt: str | None) -> str:
    """The format to write the model as (default: diffusers for the KL models, else
    safetensors); refused in one line when the model cannot go there."""
    if fmt not in (None, *FORMATS):
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    fits = isinstance(model, (AutoencoderKL, KLAutoencoder)) or (isinstance(model, QuantizedAutoencoder)
                                                                 and model.vq_model_blocker() is None)
    fmt = fmt or ("diffusers" if fits else "safetensors")
    if fmt == "diffusers" and isinstance(model, QuantizedAutoencoder) and not fits:
        raise ConfigError(f"--format diffusers: diffusers' VQModel cannot hold model {cfg.model.name!r}: "
                          f"{model.vq_model_blocker()}; use --format safetensors")
    if fmt == "diffusers" and not fits:
        latent = "x".join(map(str, model.latent_shape))
        raise ConfigError(f"--format diffusers takes the KL models (autoencoder-kl, kl-f4, kl-f8) and vq-f* with a "
                          f"plain codebook; no diffusers class fits model {cfg.model.name!r} (latent {latent}): use "
                          "--format safetensors")
    return fmt


def write_export(model: VAE, cfg: Config, source: Path, out: Path, fmt: str, stats: dict, images: int,
                 scale: dict) -> Path:
    """Write `model` (from the folder `source`) into the new folder `out` as `fmt` (see
    export_format), with its latent statistics `stats` (over `images` training images), the
    latent scale `scale` (io.latents.latent_scale) and a model card; whole or not at all
    (written under a temp name, then renamed). -> out."""
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "diffusers":
            network = (vq_model_network(model, cfg, scale["scaling_factor"]) if isinstance(model, QuantizedAutoencoder)
                       else diffusers_network(model, cfg, scale["scaling_factor"], scale["shift_factor"]))
            network.save_pretrained(tmp, safe_serialization=True)
        else:
            _save_plain(model, cfg, stats, scale, tmp)
        write_text_atomic(tmp / "README.md", model_card(model, cfg, source, fmt, stats, images, scale))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_plain(model: VAE, cfg: Config, stats: dict, scale: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    save_weights(model.state_dict(), folder / "model.safetensors")
    config = {"format": EXPORT_FORMAT, "version": 1, "config": to_dict(cfg), "latent_statistics": stats,
              "latent_scale": scale}
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def model_card(model: VAE, cfg: Config, checkpoint: Path, fmt: str, stats: dict, images: int, scale: dict) -> str:
    """README.md of an export: what the model is, what it was trained on and how, how it scores."""
    run = run_dir_of(checkpoint)
    metrics = read_json(run / METRICS) if run else None
    latent = "x".join(map(str, model.latent_shape))
    use = ('from diffusers import VQModel\nvq = VQModel.from_pretrained("THIS_FOLDER")\n'
           "x_hat = vq.decode(vq.encode(x).latents).sample  # decode quantises"
           if fmt == "diffusers" and isinstance(model, QuantizedAutoencoder) else
           'from diffusers import AutoencoderKL\nvae = AutoencoderKL.from_pretrained("THIS_FOLDER")\n'
           "z = (vae.encode(x).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor"
           if fmt == "diffusers" else
           "imgvae evaluate THIS_FOLDER --data PHOTOS   # or: from imgvae.checkpoint import load_model")
    lines = [
        f"# {cfg.model.name} exported by imgvae", "",
        f"A VAE for {cfg.data.image_size}x{cfg.data.image_size} RGB images on [-1, 1], latent {latent} "
        f"({sum(p.numel() for p in model.parameters()):,} parameters), from the checkpoint `{checkpoint}`.", "",
        "## Use", "", "```python" if fmt == "diffusers" else "```bash", use, "```", "",
        "## Training", "",
        f"- data: {', '.join(cfg.data.train)}; held out: {', '.join(cfg.data.eval) or 'none'}",
        "- command: `imgvae train --config config.yaml -o RUN` with the run's config.yaml (below)", "",
        "## Latent scaling", "",
        f"Written: {describe_scale(scale)}; `imgvae export --latent-scale "
        f"{'recompute' if scale['choice'] == 'keep' else 'keep'}` writes the other"
        + ("." if scale["own"] else " (this model has no scale of its own)."), "",
        f"Measured on {images:,} training images (the aggregate posterior's exact moments, Var = Var[mu] + "
        f"E[sigma^2]): scaling_factor {stats['scaling_factor']:.6g}, shift_factor {stats['shift_factor']:.6g}; per "
        f"channel, mean {[round(v, 4) for v in stats['channel_mean']]}, std "
        f"{[round(v, 4) for v in stats['channel_std']]}.",
        "", "## Metrics", "",
    ]
    if metrics:
        rec, lik = metrics["reconstruction"], metrics["likelihood"]
        lines.append(f"`imgvae evaluate` on {metrics['images']} held-out images ({', '.join(metrics['sources'])}): "
                     f"PSNR {rec['psnr']['mean']:.2f} dB, SSIM {rec['ssim']['mean']:.3f}, "
                     f"-ELBO {lik['neg_elbo_bpd']:.3f} bits/dim, "
                     + ", ".join(f"{k} {v:.1f}" for k, v in metrics["distribution"].items() if k != "note") + ".")
    else:
        lines.append("Not evaluated yet: `imgvae evaluate RUN` writes metrics.json.")
    if cfg.loss.sigma != "fixed" or cfg.loss.likelihood != "gaussian":
        lines += ["", f"Trained with a {cfg.loss.likelihood} likelihood, decoder noise {cfg.loss.sigma}; "
                  + ("a diffusers model keeps the decoder's mean only." if fmt == "diffusers" else "")]
    lines += ["", "## config.yaml", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
