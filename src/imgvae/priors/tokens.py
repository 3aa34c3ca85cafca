"""A learned prior over a discrete latent's code grid: MaskGIT (Chang et al. 2022). A
bidirectional transformer (models/transformer.py, the flow prior's blocks) learns to fill in
masked codes: each training grid has a share cos(pi/2 * r), r ~ U(0, 1), of its positions
masked, and the loss is the cross-entropy of the true codes there. Sampling starts from an
all-masked grid and, in `steps` iterations, draws every masked code, keeps the most confident
and masks the rest again, the masked share falling along the same cosine to none.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgvae.config import ConfigError, TokenConfig
from imgvae.models.base import VAE
from imgvae.models.generate import decode_codes
from imgvae.priors.condition import LabelEmbedding, guided
from imgvae.priors.latent_task import SAMPLES_SHOWN, LatentTask
from imgvae.priors.learned import LearnedPrior
from imgvae.priors.registry import SampleOptions, register
from imgvae.priors.transformer import TokenTransformer
from imgvae.train.task import Micro

DEFAULT_SIZE = (256, 6)  # width, depth for "auto": the flow prior's transformer's
CHOICE_TEMPERATURE = 4.5  # MaskGIT's: randomness in which codes are kept, annealed to 0


def masked_share(r: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule: the share of positions masked at progress r in [0, 1]."""
    return torch.cos(0.5 * math.pi * r)


class TokenPrior(nn.Module):
    """p(codes) of one discrete autoencoder's token grid (h, w) over codebook_size codes; with a label
    vocabulary, conditional: told a label set (a leading condition token), or nothing."""

    def __init__(self, cfg: TokenConfig, token_shape: tuple[int, int], codebook_size: int, vocabulary: int = 0):
        super().__init__()
        width = DEFAULT_SIZE[0] if cfg.width == "auto" else cfg.width
        depth = DEFAULT_SIZE[1] if cfg.depth == "auto" else cfg.depth
        self.token_shape, self.codebook_size, self.backbone = tuple(token_shape), codebook_size, "transformer"
        self.net = TokenTransformer(self.token_shape, codebook_size, width, depth)
        self.condition = LabelEmbedding(vocabulary, width) if vocabulary else None

    @property
    def mask_index(self) -> int:
        return self.codebook_size

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, h * w, codebook_size) at every position of codes (B, h, w) (mask_index: masked),
        told multi-hot labels (B, L) or nothing."""
        return self.net(tokens, None if self.condition is None else self.condition(labels, len(tokens)))

    def mask(self, tokens: torch.Tensor, r: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Which positions (B, h * w) of codes (B, h, w) are masked at progress r (B,): the
        ceil(share * h * w) (at least one) with the lowest scores (B, h * w), uniform noise."""
        n = tokens[0].numel()
        count = (masked_share(r) * n).ceil().clamp(1, n)
        ranks = scores.argsort(1).argsort(1)
        return ranks < count[:, None]

    @torch.no_grad()
    def sample(self, n: int, steps: int, generator: torch.Generator, device, temperature: float = 1.0,
               batch_size: int = 64, labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        """n code grids (n, h, w), long, on `device` (told labels (n, L) with classifier-free guidance
        W of the logits, for a conditional prior): every random number drawn on the CPU from
        `generator`, so a seed gives the same codes on any device."""
        if steps < 1:
            raise ConfigError(f"a token prior needs at least 1 decoding step, got {steps}")
        return torch.cat([self._sample(min(batch_size, n - i), steps, generator, device, temperature,
                                       None if labels is None else labels[i:i + batch_size].to(device), guidance)
                          for i in range(0, n, batch_size)])

    def _sample(self, n: int, steps: int, generator: torch.Generator, device, temperature: float,
                labels: torch.Tensor | None, guidance: float) -> torch.Tensor:
        positions = math.prod(self.token_shape)
        codes = torch.full((n, positions), self.mask_index, dtype=torch.long, device=device)
        for step in range(steps):
            masked = codes == self.mask_index
            logits = guided(self, codes.view(n, *self.token_shape), labels, guidance).float() / temperature
            gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator).clamp(1e-20, 1)))
            drawn = (logits + gumbel.to(device)).argmax(-1)  # a draw from softmax(logits / T)
            drawn = torch.where(masked, drawn, codes)
            confidence = logits.log_softmax(-1).gather(-1, drawn[..., None])[..., 0]
            choice = CHOICE_TEMPERATURE * (1 - (step + 1) / steps)
            noise = -torch.log(-torch.log(torch.rand(confidence.shape, generator=generator).clamp(1e-20, 1)))
            confidence = torch.where(masked, confidence + choice * noise.to(device), torch.inf)
            still = int(positions * float(masked_share(torch.tensor((step + 1) / steps))))  # masked after this step
            still = min(still, int(masked.sum(1).min()) - 1) if step + 1 < steps else 0
            codes = drawn
            if still > 0:
                lowest = confidence.topk(still, dim=1, largest=False).indices
                codes = codes.scatter(1, lowest, self.mask_index)
        return codes.view(n, *self.token_shape)


def token_loss(prior: TokenPrior, tokens: torch.Tensor, r: torch.Tensor, scores: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """MaskGIT's objective for code grids (B, h, w): the cross-entropy of the true codes at the
    positions masked at progress r (B,) by `scores` (B, h * w), averaged over those positions."""
    masked = prior.mask(tokens, r, scores)
    target = tokens.flatten(1).long()
    logits = prior(torch.where(masked, prior.mask_index, target).view_as(tokens), labels)
    loss = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
    return (loss * masked).sum() / masked.sum()


def sample(model: VAE, prior: TokenPrior, n: int, seed: int, steps: int, temperature: float = 1.0,
           labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
    """n images from a token prior (on the model's device): code grids decoded in `steps` iterations at
    softmax temperature T (told labels (n, L) with guidance W, for a conditional prior), every random
    number drawn on the CPU from `seed` (the same images on any device), then decoded. -> [0, 1]
    (n, 3, S, S)."""
    device = next(prior.parameters()).device
    codes = prior.sample(n, steps, torch.Generator().manual_seed(seed), device, temperature, labels=labels,
                         guidance=guidance)
    return decode_codes(model, codes)


class TokenTask(LatentTask):
    """Train a TokenPrior on the code grids (tokens.npy) in `latents` of the discrete autoencoder
    `source` describes, whose codebook has `codebook_size` codes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.codebook_size = json.loads((self.latents / "manifest.json").read_text())["tokens"]["codebook_size"]
        self.latent_shape = tuple(np.load(self.latents / "tokens.npy", mmap_mode="r").shape[1:])

    def read_rows(self) -> torch.Tensor:
        """Code grids (N, h, w), int64."""
        tokens = np.load(self.latents / "tokens.npy", mmap_mode="r")
        return torch.from_numpy(np.asarray(tokens[self.valid]).astype(np.int64))

    def build_model(self, fresh: bool) -> TokenPrior:
        self.model = TokenPrior(self.cfg, self.latent_shape, self.codebook_size, len(self.vocabulary)).to(self.device)
        return self.model

    def inputs(self, batch: torch.Tensor, micro: Micro) -> dict:
        """Code grids -> them, each one's progress r ~ U(0, 1) and its positions' scores (which
        are masked), drawn for the global batch and indexed by this process's positions."""
        generator = self.generator(micro)
        r = torch.rand(self.total, generator=generator, device=self.device)
        scores = torch.rand(self.total, math.prod(self.latent_shape), generator=generator, device=self.device)
        at = self.positions(len(batch), micro)
        return {"tokens": batch.rows.to(self.device, non_blocking=True), "r": r[at], "scores": scores[at],
                "labels": self.labels_of(batch, generator, micro)}

    def forward(self, model, inputs: dict) -> torch.Tensor:
        return token_loss(model, inputs["tokens"], inputs["r"], inputs["scores"], inputs["labels"])

    def draw(self, model: TokenPrior) -> torch.Tensor:
        codes = model.sample(SAMPLES_SHOWN, self.cfg.steps, torch.Generator().manual_seed(0), self.device,
                             labels=self.shown_labels(), guidance=self.cfg.guidance)
        return decode_codes(self.autoencoder, codes)


class TokenKind(LearnedPrior):
    name, task = "tokens", TokenTask

    def resolve(self, section: TokenConfig, model: VAE) -> TokenConfig:
        return replace(section, backbone="transformer")

    def build(self, section: TokenConfig, latent_shape, model: VAE, vocabulary: int = 0) -> TokenPrior:
        return TokenPrior(section, model.token_shape, model.codebook_size, vocabulary)

    def draw(self, model: VAE, prior: TokenPrior, options: SampleOptions):
        return lambda n, seed, labels=None: sample(model, prior, n, seed, options.steps, options.temperature,
                                                   labels, options.guidance)


register(TokenKind())
