"""VA-VAE's vision-foundation alignment of an autoencoder's latent (Yao et al. 2025, LightningDiT):
the posterior mean (B, C, h, w), through a learned 1x1 projection, is pulled towards a frozen
pretrained network's feature map of the same images (metrics.features.RepresentationFeatures,
resized to the latent grid), so that the latent space is easier for a generator to learn.

Two margin terms (VA-VAE's): the cosine similarity of each position's projected latent and feature
above 1 - m1 costs nothing (margin cosine), and the latent's position-to-position cosine
similarities match the features' within m2 (margin distance matrix). Their sum is weighted by
loss.align times an adaptive weight, the ratio of the reconstruction loss's gradient norm to
theirs at the encoder's last layer, as VA-VAE (and taming's GAN weight) does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgvae.metrics.features import RepresentationFeatures

COSINE_MARGIN, DISTANCE_MARGIN = 0.5, 0.25  # VA-VAE's m1, m2
MAX_WEIGHT = 1e4


def margin_cosine(z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Mean over positions of relu(1 - m1 - cos(z_ij, f_ij)); z, f (B, D, h, w)."""
    return F.relu(1 - COSINE_MARGIN - F.cosine_similarity(z, f, dim=1)).mean()


def margin_distance_matrix(z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Mean over position pairs of relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m2); z, f (B, D, h, w)."""
    zn, fn = F.normalize(z.flatten(2), dim=1), F.normalize(f.flatten(2), dim=1)  # (B, D, N)
    return F.relu((zn.transpose(1, 2) @ zn - fn.transpose(1, 2) @ fn).abs() - DISTANCE_MARGIN).mean()


class LatentAligner:
    """The alignment term of a training step: the frozen features (no gradient), the projection
    (a submodule of the model, `align_projection`, so the optimiser, checkpoints and resume carry
    it; the model's users drop it, io.checkpoint.TRAINING_ONLY) and the adaptive weight."""

    def __init__(self, weight: float, model: nn.Module, latent_channels: int, device: torch.device):
        self.weight = weight
        self.features = RepresentationFeatures().to(device)
        model.align_projection = nn.Conv2d(latent_channels, RepresentationFeatures.CHANNELS, 1).to(device)

    def term(self, model: nn.Module, images: torch.Tensor, mean: torch.Tensor, loss: torch.Tensor
             ) -> tuple[torch.Tensor, dict]:
        """(weighted alignment loss, its statistics) for [-1, 1] images (B, 3, S, S) whose posterior
        means are `mean` (B, C, h, w), `loss` the step's loss before it (for the adaptive weight)."""
        with torch.no_grad():
            target = self.features((images.float() + 1) / 2, mean.shape[-1])
        projected = model.align_projection(mean.float())
        raw = margin_cosine(projected, target) + margin_distance_matrix(projected, target)
        last = model.encoder_last_layer()
        rec_grad = torch.autograd.grad(loss, last, retain_graph=True)[0].norm()
        align_grad = torch.autograd.grad(raw, last, retain_graph=True)[0].norm()
        adaptive = (rec_grad / (align_grad + 1e-6)).clamp(max=MAX_WEIGHT).detach()
        return self.weight * adaptive * raw, {"align": raw.detach(), "align_weight": adaptive}
