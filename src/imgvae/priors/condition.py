"""What a conditional prior is told to draw: a condition vector per sample, added to the time
embedding of a flow's network (adaLN for the transformer, as DiT; the UNet's class embedding) or
given as a leading token to the token prior's transformer (MaskGIT's class token). Labels become
that vector here; a caption encoder that gives (B, dim) vectors could take this module's place
without the priors changing."""

from __future__ import annotations

import torch
from torch import nn


class LabelEmbedding(nn.Module):
    """Multi-hot labels (B, L) -> condition vectors (B, dim): the mean of the present labels'
    learned embeddings. The empty set (an unlabelled image, a label dropped in training, sampling
    without a condition) is one learned null vector: the unconditional branch of classifier-free
    guidance is the same network told nothing."""

    def __init__(self, vocabulary: int, dim: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocabulary, dim) * 0.02)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        if labels is None:
            return self.null.expand(batch, -1)
        labels = labels.float()
        count = labels.sum(1, keepdim=True)
        return torch.where(count > 0, labels @ self.table / count.clamp(min=1), self.null)


def dropped(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Labels with the rows where keep is false emptied (label dropout: those train the null branch)."""
    return labels * keep[:, None].to(labels.dtype)


def guided(predict, x: torch.Tensor, labels: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance of predict(x, labels) (a velocity, or logits): u + W (c - u), with u
    told nothing and c the labels; W = 1 is plain conditional (one pass), W = 0 unconditional."""
    if labels is None or guidance == 0:
        return predict(x, None)
    if guidance == 1:
        return predict(x, labels)
    both = predict(torch.cat([x, x]), torch.cat([torch.zeros_like(labels), labels])).float()
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)
