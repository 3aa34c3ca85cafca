"""A model's own prior, the one its loss assumes: N(0, I) over a continuous latent, codes drawn
uniformly over a discrete latent's codebook. Every model has it; decoded, it shows what the KL
term alone buys (blurry blobs for the seed, texture for a spatial latent, noise for codes)."""

from __future__ import annotations

import torch

from imgvae.config.prior_sections import OWN_PRIOR_TITLES
from imgvae.models.generate import decode, decode_codes, prior_noise
from imgvae.priors.registry import PriorKind, SampleOptions, register


def sample(model, n: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """n images from the model's own prior, [0, 1] (n, 3, S, S): N(0, T^2 I) latents decoded, or
    for a discrete latent uniform codes; the same seed gives the same images."""
    if model.discrete:
        generator = torch.Generator().manual_seed(seed)
        return decode_codes(model, torch.randint(model.codebook_size, (n, *model.token_shape), generator=generator))
    return decode(model, prior_noise(model, n, seed, temperature))


class StandardPrior(PriorKind):
    name, preference = "standard", 0

    def title(self, discrete: bool) -> str:
        return OWN_PRIOR_TITLES[discrete]

    def models(self, discrete: bool) -> bool:
        return True

    def has(self, model, prior_run=None) -> bool:
        return True

    def sampler(self, model, options: SampleOptions):
        return lambda n, seed: sample(model, n, seed, options.temperature)


register(StandardPrior())
