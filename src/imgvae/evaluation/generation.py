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
from imgvae.data.loading import eval_loader
from imgvae.data.sources import SourceError
from imgvae.io.paths import run_dir_of
from imgvae.io.priors import available_priors, prior_sampler
from imgvae.models.base import VAE, inference
from imgvae.models.features import EffNetFeatures, GaussianStats, frechet_distance

K_NEAREST = 3  # Kynkäänniemi et al.'s k


def pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64."""
    return torch.cdist(a.double(), b.double())


def knn_radii(features: torch.Tensor, k: int = K_NEAREST) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set."""
    d = pairwise(features, features)
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, dim=1).values


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K_NEAREST) -> tuple[float, float]:
    """Precision: the share of fake points inside the real manifold (the union of balls around
    each real point reaching its k-th real neighbour); recall: the share of real points inside
    the fake manifold."""
    d = pairwise(fake, real)
    precision = (d <= knn_radii(real, k)[None]).any(1).double().mean()
    recall = (d.T <= knn_radii(fake, k)[None]).any(1).double().mean()
    return float(precision), float(recall)


def memorised_share(train: torch.Tensor, samples: torch.Tensor) -> float:
    """The share of samples whose nearest training point is closer than training points typically
    are to their own nearest neighbour (the median of those distances): copies score 1."""
    typical = knn_radii(train, 1).median()
    return float((pairwise(samples, train).min(1).values < typical).double().mean())


def scores(train: torch.Tensor, images: torch.Tensor) -> dict:
    """fd_effnet, precision, recall and memorised share of a set of features against the training set's."""
    a, b = GaussianStats(), GaussianStats()
    a.add(train)
    b.add(images)
    precision, recall = precision_recall(train, images)
    return {"fd_effnet": frechet_distance(a, b), "precision": precision, "recall": recall,
            "memorised": memorised_share(train, images)}


@torch.no_grad()
def features_of(net: EffNetFeatures, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(net.parameters()).device
    return torch.cat([net(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


@torch.no_grad()
def generation_metrics(model: VAE, train_views, samplers: dict[str, Callable[[int, int], torch.Tensor]], *,
                       images: int, batch_size: int, seed: int, held_out=None, progress: bool = False) -> dict:
    """Scores of each prior's samples (samplers: {name: (n, seed) -> [0, 1] images}) against
    `images` training views spread evenly over train_views, and of the reconstructions of those
    views (the floor); with held_out views, of real held-out images too (what a perfect prior
    scores, memorised share included). -> {"images", "floor", "held_out", "priors": {name: scores}}."""
    real = _views(train_views, images, batch_size)
    with inference(model) as device:
        net = EffNetFeatures().to(device)
        recon = torch.cat([denormalize(model(normalize(chunk.to(device)), sample=False).x_hat.float()).cpu()
                           for chunk in real.split(batch_size)])
        train = features_of(net, real.float() / 255, batch_size)
        result = {"images": len(real), "k": K_NEAREST, "floor": scores(train, features_of(net, recon, batch_size))}
        if held_out is not None:
            result["held_out"] = scores(train, features_of(net, _views(held_out, len(real), batch_size) / 255,
                                                           batch_size))
        result["priors"] = {}
        for name, draw in tqdm(samplers.items(), desc="generation", disable=not progress, dynamic_ncols=True):
            result["priors"][name] = scores(train, features_of(net, draw(len(real), seed), batch_size))
    return result


def _views(dataset, count: int, batch_size: int) -> torch.Tensor:
    """`count` readable views spread evenly over the dataset, uint8 (n, 3, S, S)."""
    count = min(count, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    loader = eval_loader(dataset, batch_size, torch.device("cpu"), indices=indices)
    return torch.cat([images for images, _, _ in loader if len(images)])


def score_priors(checkpoint: str | Path, model: VAE, cfg: Config, sources: list[str], progress: bool = False,
                 prior_run: str | Path | None = None) -> dict | None:
    """Every prior the model has, scored by generation_metrics against the training distribution:
    eval.sample_reference, else the run's data.train views; the images evaluated when the model has
    no run or its training data cannot be read here (the result's "reference" says which). The
    evaluated images are the real held-out ones. None when there are too few images to score."""
    reference = cfg.eval.sample_reference or (cfg.data.train if run_dir_of(checkpoint) else sources)
    try:
        train_views = build_dataset(reference, cfg.data, train=True, seed=cfg.train.seed)
    except SourceError:  # e.g. a run moved from the machine it was trained on
        reference = sources
        train_views = build_dataset(reference, cfg.data, train=True, seed=cfg.train.seed)
    held_out = build_dataset(sources, cfg.data, train=False, seed=cfg.train.seed)
    if min(len(train_views), len(held_out), cfg.eval.generation_images) <= K_NEAREST:
        return None  # no k-nearest-neighbour manifold on so few images
    samplers = dict(prior_sampler(checkpoint, model, kind, prior_run=prior_run)
                    for kind in available_priors(checkpoint, prior_run))
    result = generation_metrics(model, train_views, samplers, images=cfg.eval.generation_images,
                                batch_size=cfg.eval_batch_size, seed=cfg.eval_seed, held_out=held_out,
                                progress=progress)
    return {"reference": list(reference), **result}
