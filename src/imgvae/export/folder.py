"""`imgvae export`: a trained model as a folder other tools read, whole or not at all. The
autoencoder alone (autoencoder.py), or, when the model has a flow prior and goes to diffusers,
the whole generator: a diffusers pipeline folder (model_index.json, unet/, vae/, scheduler/,
pipeline.py), each with a model card (card.py)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from imgvae.config import ConfigError, to_dict
from imgvae.data.datasets import build_dataset
from imgvae.data.sources import SourceError
from imgvae.errors import ImgvaeWarning
from imgvae.export.autoencoder import FORMATS, diffusers_autoencoder, export_format, write_autoencoder
from imgvae.export.card import model_card
from imgvae.export.prior import NO_TOKEN_PIPELINE, diffusers_unet, exportable, flow_scheduler, pipeline_config
from imgvae.io.checkpoint import readable_by_group
from imgvae.io.latents import latent_moments, latent_scale, scale_choice
from imgvae.io.paths import open_model, provenance_of
from imgvae.models.base import VAE
from imgvae.priors import runs
from imgvae.priors.registry import kind_of, refuse
from imgvae.rundir import write_text_atomic
from imgvae.runtime import pick_device

PRIORS = ("auto", "none", "flow", "tokens")  # --prior: what goes with the autoencoder


class ExportNotice(ImgvaeWarning):
    """A learned prior left out of an export (`--prior auto`), and why."""


def prior_to_export(model: VAE, fmt: str, prior: str, prior_run: str | Path | None) -> runs.Loaded | None:
    """The flow prior that goes into the export as a pipeline, or None: "none" never; "flow" (and
    "tokens") the one named, refused in one line when it has no diffusers form; "auto" the model's
    flow prior where it has one that exports (else the autoencoder alone, with an ExportNotice)."""
    if prior not in PRIORS:
        raise ConfigError(f"--prior {prior!r} is not one of {list(PRIORS)}")
    if prior == "none":
        return None
    if prior == "tokens":
        refuse("tokens", model.discrete, "--prior tokens")
        raise ConfigError(NO_TOKEN_PIPELINE)
    if model.discrete:
        if prior == "flow":
            refuse("flow", True, "--prior flow")
        if runs.has_run(runs.default_run(model, "tokens")):
            warnings.warn(f"{NO_TOKEN_PIPELINE.split(';')[0]}; the autoencoder alone is written", ExportNotice,
                          stacklevel=2)
        return None
    loaded = runs.load(model, kind_of("flow"), "cpu", prior_run, required=prior == "flow")
    if loaded is None:
        return None
    if fmt != "diffusers":
        if prior == "flow":
            raise ConfigError("--prior flow writes a diffusers pipeline: it needs --format diffusers (or --prior none)")
        warnings.warn("export: --format safetensors writes the autoencoder alone; its flow prior goes with it into a "
                      "diffusers pipeline with --format diffusers", ExportNotice, stacklevel=2)
        return None
    try:
        exportable(loaded.network)
    except ConfigError as e:
        if prior == "flow":
            raise
        warnings.warn(f"{e}; the autoencoder alone is written", ExportNotice, stacklevel=2)
        return None
    return loaded


def write_pipeline(model: VAE, cfg, prior: runs.Loaded, folder: Path, scale: dict) -> None:
    """The generator into `folder`: diffusers' save_pretrained of an ImgvaeFlowPipeline, and
    pipeline.py (its code) beside it, which model_index.json names: DiffusionPipeline.from_pretrained(FOLDER,
    trust_remote_code=True) loads it without imgvae."""
    from imgvae.export.pipeline import ImgvaeFlowPipeline

    pipe = ImgvaeFlowPipeline(unet=diffusers_unet(prior.network), vae=diffusers_autoencoder(model, cfg, scale),
                              scheduler=flow_scheduler(),
                              **pipeline_config(prior.network, prior.section, prior.vocabulary))
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(Path(__file__).with_name("pipeline.py"), folder / "pipeline.py")
    index = json.loads((folder / "model_index.json").read_text())  # the class in pipeline.py, as Hub pipelines name it
    index["_class_name"] = ["pipeline", ImgvaeFlowPipeline.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def readable(folder: Path) -> None:
    """Every weights file as the user's umask says (safetensors writes 0600 whatever it is)."""
    for path in folder.rglob("*.safetensors"):
        readable_by_group(path)


def export_model(checkpoint: str | Path, out_dir: str | Path, fmt: str | None = None, sources: list[str] | None = None,
                 images: int = 10_000, overrides: list[str] | dict | None = None, device: str = "auto",
                 scale: str | None = None, prior: str = "auto", prior_run: str | Path | None = None,
                 progress: bool = True) -> Path:
    """Write the model of `checkpoint` (its EMA weights when kept) into the new folder out_dir as
    `fmt` (default: diffusers where a diffusers class holds it, else safetensors); with its flow
    prior (prior: auto | none | flow | tokens, prior_run: its folder when not beside the model) as
    a diffusers pipeline. The latent statistics come from `images` training images (default
    sources: its data.train, its training crops, as `fit-prior` sees them); the latent scale
    written is the model's own (a diffusers folder's it started from) or those statistics'
    (scale: "keep" | "recompute", io.latents.scale_choice); the model card records both. -> out_dir."""
    if fmt not in (None, *FORMATS):  # before the model is read
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    if prior not in PRIORS:
        raise ConfigError(f"--prior {prior!r} is not one of {list(PRIORS)}")
    model, cfg, folder = open_model(checkpoint, pick_device(device), overrides=overrides)
    fmt = export_format(model, cfg, fmt)
    generator = prior_to_export(model, fmt, prior, prior_run)
    scale_choice(cfg.model, scale)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SourceError(f"{out} exists and is not an empty folder")
    dataset = build_dataset(sources or cfg.data.train, cfg.data, train=True, seed=cfg.train.seed)
    stats = latent_moments(model, dataset, cfg.eval_batch_size, images, progress)
    scale = latent_scale(cfg.model, stats, scale)
    counted = min(images or len(dataset), len(dataset))
    return write_folder(model, cfg, folder, out, fmt, stats, counted, scale, generator)


def write_folder(model: VAE, cfg, source: Path, out: Path, fmt: str, stats: dict, images: int, scale: dict,
                 generator: runs.Loaded | None) -> Path:
    """`model` (from the folder `source`), with its flow prior `generator` when not None, into the new
    folder `out`, with its latent statistics `stats` (over `images` training images), the latent
    scale `scale` and a model card; whole or not at all (written under a temp name, then renamed)."""
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        described = None
        if generator is None:
            write_autoencoder(model, cfg, tmp, fmt, stats, scale)
            kind = "imgvae" if fmt == "safetensors" else ("VQModel" if model.discrete else "AutoencoderKL")
        else:
            write_pipeline(model, cfg, generator, tmp, scale)
            kind = "pipeline"
            described = {"title": f"{generator.section.title}, {generator.network.backbone}",
                         "labels": generator.vocabulary, "folder": str(generator.folder),
                         "section": to_dict(generator.section), "summary": runs.run_summary(generator.folder),
                         "parameters": sum(p.numel() for p in generator.network.parameters())}
        where = provenance_of(model)  # None for a model built in code
        card = model_card(model, cfg, source, kind, stats, images, scale, where and where.run, described)
        write_text_atomic(tmp / "README.md", card)
        readable(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
