"""Generation measured honestly: each prior's samples against the training distribution, in
EfficientNet-Lite0 features (fd_effnet), with precision and recall (the k-nearest-neighbour
manifolds of Kynkäänniemi et al. 2019) and a memorisation check, so that a prior copying
training images cannot score well unnoticed; and the floor, the reconstructions of training
images, which no prior can beat with this decoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from imgvae.config import Config
from imgvae.data.datasets import build_dataset
from imgvae.data.decode import denormalize, normalize
from imgvae.data.labels import read_labels, view_files
from imgvae.data.loading import eval_loader
from imgvae.data.sources import SourceError
from imgvae.evaluation.results import Generation, Scores
from imgvae.evaluation.steering import label_classifier, per_label_distances
from imgvae.io.paths import provenance_of
from imgvae.metrics.distances import K_NEAREST, scores
from imgvae.metrics.features import EffNetFeatures
from imgvae.models.base import VAE, inference
from imgvae.priors import SampleOptions, available, sampler


@torch.no_grad()
def features_of(net: EffNetFeatures, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(net.parameters()).device
    return torch.cat([net(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


@torch.no_grad()
def generation_metrics(model: VAE, train_views, samplers: dict[str, Callable[[int, int], torch.Tensor]], *,
                       images: int, batch_size: int, seed: int, held_out=None, progress: bool = False,
                       reference: list[str] = ()) -> Generation:
    """Scores of each prior's samples (samplers: {name: (n, seed) -> [0, 1] images}) against
    `images` training views spread evenly over train_views (made from the sources `reference`),
    and of the reconstructions of those views (the floor); with held_out views, of real held-out
    images too (what a perfect prior scores, memorised share included)."""
    real, indices = _views(train_views, images, batch_size)
    with inference(model) as device:
        net = EffNetFeatures().to(device)
        recon = torch.cat([denormalize(model(normalize(chunk.to(device)), sample=False).x_hat.float()).cpu()
                           for chunk in real.split(batch_size)])
        train = features_of(net, real.float() / 255, batch_size)

        def scored(images: torch.Tensor) -> Scores:
            return Scores(**scores(train, features_of(net, images, batch_size)))

        result = Generation(reference=list(reference), images=len(real), k=K_NEAREST, floor=scored(recon))
        if held_out is not None:
            result.held_out = scored(_views(held_out, len(real), batch_size)[0] / 255)
        for name, draw in tqdm(samplers.items(), desc="generation", disable=not progress, dynamic_ncols=True):
            if getattr(draw, "labels", ()):  # conditional: each sample asked for a training view's labels
                result.priors[name] = _steered(draw, train_views, indices, train, seed, net, batch_size)
            else:
                result.priors[name] = scored(draw(len(real), seed))
    return result


def _steered(draw, train_views, indices: list[int], train: torch.Tensor, seed: int, net, batch_size: int) -> Scores:
    """A conditional prior's scores: samples asked for the labels of the real views they are compared
    with (so the label mix is the training set's), and whether they show them (steering.py)."""
    labels = read_labels(draw.label_spec, train_views.source)
    files = view_files(train_views)[indices]
    sets = [tuple(labels.vocabulary[k] for k in labels.rows[f] if labels.vocabulary[k] in draw.labels)
            for f in files]
    samples = features_of(net, draw(len(sets), seed, sets), batch_size)
    result = Scores(**scores(train, samples), guidance=draw.guidance)
    classifier = label_classifier(train, sets, list(draw.labels))
    if classifier is not None:
        result.label_metric, result.label_ceiling = classifier.metric, classifier.ceiling
        result.label_score = classifier.score(samples, sets)
    result.per_label = per_label_distances(train, sets, samples, sets, list(draw.labels)) or None
    return result


def _views(dataset, count: int, batch_size: int) -> tuple[torch.Tensor, list[int]]:
    """`count` readable views spread evenly over the dataset, uint8 (n, 3, S, S), and their indices."""
    count = min(count, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    loader = eval_loader(dataset, batch_size, torch.device("cpu"), indices=indices)
    batches = [(images, index) for images, index, _ in loader if len(images)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]).tolist()


def score_priors(model: VAE, cfg: Config, sources: list[str], progress: bool = False,
                 prior_run: str | Path | None = None) -> Generation | None:
    """Every prior the model (as open_model read it) has, scored by generation_metrics against the
    training distribution: eval.sample_reference, else the run's data.train views; the images
    evaluated when the model has no run or its training data cannot be read here (the result's
    "reference" says which). The evaluated images are the real held-out ones. None when there are
    too few images to score."""
    where = provenance_of(model)
    reference = cfg.eval.sample_reference or (cfg.data.train if where and where.run else sources)
    try:
        train_views = build_dataset(reference, cfg.data, train=True, seed=cfg.train.seed)
    except SourceError:  # e.g. a run moved from the machine it was trained on
        reference = sources
        train_views = build_dataset(reference, cfg.data, train=True, seed=cfg.train.seed)
    held_out = build_dataset(sources, cfg.data, train=False, seed=cfg.train.seed)
    if min(len(train_views), len(held_out), cfg.eval.generation_images) <= K_NEAREST:
        return None  # no k-nearest-neighbour manifold on so few images
    options = SampleOptions(prior_run=prior_run)
    samplers = {kind: sampler(model, kind, options) for kind in available(model, prior_run)}
    return generation_metrics(model, train_views, samplers, images=cfg.eval.generation_images,
                              batch_size=cfg.eval_batch_size, seed=cfg.eval_seed, held_out=held_out,
                              progress=progress, reference=reference)
