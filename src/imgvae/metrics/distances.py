"""Distances between sets of feature vectors: the Fréchet distance of their Gaussians, the
k-nearest-neighbour precision and recall of Kynkäänniemi et al. (2019), and the share of samples
that copy a training point. Features that are not finite (a diverged model's images) give NaN
scores before any linear algebra touches them."""

from __future__ import annotations

import math

import torch


class GaussianStats:
    """Running mean and covariance of feature vectors, accumulated in float64."""

    def __init__(self):
        self.n, self.sum, self.outer, self.finite = 0, None, None, True

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().double().cpu()
        self.finite = self.finite and bool(torch.isfinite(f).all())
        if self.sum is None:
            dims = f.shape[1]
            self.sum, self.outer = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ValueError("a Fréchet distance needs at least 2 images per set")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean, cov


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2); the trace of the square
    root is the sum of sqrt(eigenvalues of S_a S_b), which are real and >= 0 up to
    round-off. NaN when either set's features are not finite: oneMKL's eigensolver crashes the
    process on them."""
    if not (a.finite and b.finite):
        return math.nan
    mu_a, cov_a = a.mean_cov()
    mu_b, cov_b = b.mean_cov()
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace)


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
    """fd_effnet, precision, recall and memorised share of a set of features against the training set's
    (all NaN for features that are not finite)."""
    if not (torch.isfinite(train).all() and torch.isfinite(images).all()):
        return dict.fromkeys(("fd_effnet", "precision", "recall", "memorised"), math.nan)
    a, b = GaussianStats(), GaussianStats()
    a.add(train)
    b.add(images)
    precision, recall = precision_recall(train, images)
    return {"fd_effnet": frechet_distance(a, b), "precision": precision, "recall": recall,
            "memorised": memorised_share(train, images)}


