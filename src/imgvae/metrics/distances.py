"""Distances between sets of feature vectors, through the field's own code: the Fréchet distance
(torchmetrics' FrechetInceptionDistance, told the features), the kernel distance KID (torch-fidelity's
unbiased MMD estimate over random subsets: unlike the Fréchet distance, not biased by a small n),
the k-nearest-neighbour precision and recall of Kynkäänniemi et al. (2019; torch-fidelity's prc),
and the share of samples that copy a training point (imgvae's). Features that are not finite (a
diverged model's images) give NaN scores before any linear algebra touches them: oneMKL's
eigensolver crashes the process on them."""

from __future__ import annotations

import math

import torch
from torch import nn

K_NEAREST = 3  # Kynkäänniemi et al.'s k
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0  # torch-fidelity's defaults but the seed


class FeatureSet:
    """Feature vectors of one image set, gathered batch by batch on the CPU."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def add(self, features: torch.Tensor) -> None:
        self.parts.append(features.detach().float().cpu())

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, 0)


class _Given(nn.Module):
    """The feature network of a metric told the features themselves."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def finite(*sets: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(s).all()) for s in sets)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of the Gaussians of two feature sets
    (n, d), in float64: torchmetrics' FrechetInceptionDistance over these features. NaN when
    either is not finite; ValueError with fewer than 2 vectors in a set."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(a), len(b)) < 2:
        raise ValueError("a Fréchet distance needs at least 2 images per set")
    if not finite(a, b):
        return math.nan
    metric = FrechetInceptionDistance(feature=_Given(a.shape[1]))
    metric.update(a.double(), real=True)
    metric.update(b.double(), real=False)
    return float(metric.compute())


def kernel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """KID: the unbiased squared MMD of the cubic polynomial kernel between two feature sets, averaged
    over KID_SUBSETS random subsets of min(KID_SUBSET_SIZE, n) vectors each (torch-fidelity's, seeded:
    the same sets give the same value). NaN when either is not finite."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    if not finite(a, b):
        return math.nan
    size = min(KID_SUBSET_SIZE, len(a), len(b))
    return kid_features_to_metric(a.double(), b.double(), kid_subsets=KID_SUBSETS, kid_subset_size=size,
                                  rng_seed=KID_SEED, verbose=False)[KEY_METRIC_KID_MEAN]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K_NEAREST) -> tuple[float, float]:
    """Precision: the share of fake points inside the real manifold (the union of balls around
    each real point reaching its k-th real neighbour); recall: the share of real points inside
    the fake manifold (torch-fidelity's prc, in float64)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    out = prc_features_to_metric(fake.double(), real.double(), prc_neighborhood=k, prc_batch_size=10_000,
                                 save_cpu_ram=False, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def memorised_share(train: torch.Tensor, samples: torch.Tensor) -> float:
    """The share of samples whose nearest training point is closer than training points typically
    are to their own nearest neighbour (the median of those distances): copies score 1."""
    d = torch.cdist(train.double(), train.double())
    d.fill_diagonal_(float("inf"))
    typical = d.min(1).values.median()
    return float((torch.cdist(samples.double(), train.double()).min(1).values < typical).double().mean())


def scores(train: torch.Tensor, images: torch.Tensor) -> dict:
    """fd_effnet, kid_effnet, precision, recall and memorised share of a set of features against the
    training set's, and the images counted (the scores NaN for features that are not finite)."""
    counted = {"images": len(images)}
    if not finite(train, images):
        return dict.fromkeys(("fd_effnet", "kid_effnet", "precision", "recall", "memorised"), math.nan) | counted
    precision, recall = precision_recall(train, images)
    return {"fd_effnet": frechet_distance(train, images), "kid_effnet": kernel_distance(train, images),
            "precision": precision, "recall": recall, "memorised": memorised_share(train, images)} | counted
