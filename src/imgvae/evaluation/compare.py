"""`imgvae compare A B [C ...]`: several autoencoders on the same images, one page. Every model
sees the same preprocessed pixels (decoded once and kept in RAM) at one resolution, is scored by
`evaluate` with the same settings and noise, and timed; the pictures put the models side by side.
DIR/compare.json holds the numbers, per image too; DIR/compare.html shows them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from imgvae.config import Config, ConfigError, DataConfig, from_dict, merge_overrides, to_dict
from imgvae.data.datasets import ONE_CENTRE_VIEW, ImageDataset, build_dataset, first_images
from imgvae.data.decode import normalize
from imgvae.evaluation.compare_page import write_compare_page
from imgvae.evaluation.evaluate import evaluate
from imgvae.evaluation.generation import score_priors
from imgvae.evaluation.results import Metrics
from imgvae.io.paths import model_source, open_model
from imgvae.io.pictures import save_labelled_rows
from imgvae.models.base import VAE, inference
from imgvae.models.generate import reconstruct
from imgvae.priors import available, sampler
from imgvae.priors.gmm import LatentPrior, fitted_prior_of
from imgvae.rundir import write_text_atomic
from imgvae.runtime import pick_device

LABEL_ROWS = 4  # a conditional prior's samples of its most frequent labels, a row each
MEMORY_BUDGET = 4 * 2**30  # the shared views are decoded once and kept for every model
EVAL_DEFAULTS = {"batch_size": 32, "seed": 0, "limit": 0}  # the same batches and noise for every model


@dataclass
class Candidate:
    name: str
    path: str
    kind: str  # "checkpoint", "export" or "diffusers"
    native_size: int
    model: VAE
    cfg: Config
    prior: LatentPrior | None
    folder: Path  # the folder read: where its priors are found


def parse_specs(specs: list[str]) -> list[tuple[str, str]]:
    """["NAME=PATH" or "PATH", ...] -> [(name, path)]; a name defaults to the folder's."""
    if len(specs) < 2:
        raise ConfigError("imgvae compare needs at least two models")
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = Path(spec).resolve().name, spec
        pairs.append((name, path))
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise ConfigError(f"two models are called the same in {names}: name them, e.g. seed=runs/demo")
    return pairs


def open_candidates(pairs: list[tuple[str, str]], size: int | None, overrides: dict, device) -> list[Candidate]:
    """Every model, at the comparison's image size (default: the first one's native size) and
    evaluation settings; a model that cannot take that size is refused here, before any image
    is read."""
    sources = [(name, path, *model_source(path)) for name, path in pairs]
    size = size or sources[0][3]
    settings = merge_overrides({"eval": EVAL_DEFAULTS}, overrides, {"data": {"image_size": size}})
    candidates = []
    for name, path, kind, native in sources:
        try:
            model, cfg, folder = open_model(path, device, overrides=settings)
        except ConfigError as e:
            raise ConfigError(f"{name} ({path}): {e}") from None
        candidates.append(Candidate(name, path, kind, native, model, cfg, fitted_prior_of(model), folder))
    return candidates


def shared_views(sources: list[str], size: int, overrides: dict) -> ImageDataset:
    """The images every model sees: one centre view each (unless the data overrides say
    otherwise), decoded once into RAM."""
    values = merge_overrides({"data": to_dict(from_dict({}))["data"] | ONE_CENTRE_VIEW | {"image_size": size}},
                             {"data": overrides.get("data", {})})
    cfg: DataConfig = from_dict(values).data
    dataset = build_dataset(sources, cfg, train=False, seed=0)
    dataset.keep_in_memory(MEMORY_BUDGET, shared=False)
    return dataset


def speed(model: VAE, views: torch.Tensor, repeats: int = 3) -> float:
    """Encode + decode images per second on this machine (posterior mean, after a warm-up)."""
    with inference(model) as device:
        x = normalize(views).to(device)
        model(x, sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * len(x) / (time.perf_counter() - start)


def compare(specs: list[str], sources: list[str], out_dir: str | Path, *, image_size: int | None = None,
            overrides: list[str] | dict | None = None, pictures: int = 8, device: str = "auto",
            progress: bool = True) -> dict:
    """Compare the models `specs` (["NAME=PATH" or "PATH"]) on the images of `sources`; write
    out_dir/compare.json, compare.html and its pictures. -> the compare.json dict."""
    overrides = merge_overrides(overrides)
    candidates = open_candidates(parse_specs(specs), image_size, overrides, pick_device(device))
    size = candidates[0].cfg.data.image_size
    views = shared_views(sources, size, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for c in tqdm(candidates, desc="models", disable=not progress, dynamic_ncols=True):
        metrics = evaluate(c.model, c.cfg, sources, prior=c.prior, progress=progress, held_out=views, per_image=True)
        if c.cfg.eval.generation_images:  # every prior it has, against the training distribution
            metrics.generation = score_priors(c.model, c.cfg, sources, progress)
        batch = first_images(views, min(len(views), c.cfg.eval_batch_size))
        results.append(_model_entry(c, metrics, speed(c.model, batch)))
    data = {"image_size": size, "sources": list(sources), "images": results[0]["metrics"]["images"],
            "preprocessing": results[0]["metrics"]["preprocessing"], "models": results}
    data["pictures"] = _pictures(candidates, views, data, out, pictures)
    write_text_atomic(out / "compare.json", json.dumps(data, indent=1))
    write_compare_page(out, data)
    return data


def _model_entry(c: Candidate, metrics: Metrics, images_per_second: float) -> dict:
    per_image, metrics.per_image = metrics.per_image, None
    return {
        "name": c.name, "path": c.path, "kind": c.kind, "native_size": c.native_size,
        "parameters": sum(p.numel() for p in c.model.parameters()), "latent_shape": list(c.model.latent_shape),
        "latent_numbers": int(torch.Size(c.model.latent_shape).numel()), "img_per_s": images_per_second,
        "has_likelihood": c.kind != "diffusers", "fitted_prior": c.prior is not None,
        "metrics": metrics.to_dict(), "per_image": per_image,
    }


def _pictures(candidates: list[Candidate], views: ImageDataset, data: dict, out: Path, k: int) -> dict:
    """reconstructions.png: the k images where the models differ most (per-image PSNR spread)
    and every model's reconstruction of them; worst_<i>.png: model i's k worst images;
    samples.png: k samples of every prior of every model. -> their file names."""
    psnr = torch.tensor([m["per_image"]["psnr"] for m in data["models"]])  # (models, images)
    index = {key: i for i, key in enumerate(data["models"][0]["per_image"]["keys"])}
    keys = data["models"][0]["per_image"]["keys"]
    spread = psnr.max(0).values - psnr.min(0).values
    chosen = [keys[i] for i in spread.argsort(descending=True)[:k].tolist()]

    position = {views.view_name(i): i for i in range(len(views))}

    def images_of(names):
        return torch.stack([views[position[key]][0] for key in names])

    truth = images_of(chosen)
    rows = [("images (largest PSNR spread first)", truth.float() / 255)]
    rows += [(c.name, reconstruct(c.model, normalize(truth))) for c in candidates]
    save_labelled_rows(rows, out / "reconstructions.png")
    files = {"reconstructions": "reconstructions.png", "chosen": chosen, "worst": {}}
    for i, (c, m) in enumerate(zip(candidates, data["models"])):
        worst = sorted(m["per_image"]["keys"], key=lambda key: m["per_image"]["psnr"][index[key]])[:k]
        images = images_of(worst)
        save_labelled_rows([("images", images.float() / 255), (c.name, reconstruct(c.model, normalize(images)))],
                           out / f"worst_{i}.png", label_width=120)
        files["worst"][c.name] = {"file": f"worst_{i}.png", "keys": worst}
    samples = []
    for c in candidates:
        for kind in available(c.model):
            drawn = sampler(c.model, kind)
            samples.append((f"{c.name}, {drawn.title}", drawn(k, 0)))
            samples += [(f"{c.name}, {drawn.title}: {label}", drawn(k, 0, ((label,),)))
                        for label in drawn.labels[:LABEL_ROWS]]
    save_labelled_rows(samples, out / "samples.png")
    files["samples"] = "samples.png"
    return files

