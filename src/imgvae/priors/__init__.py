"""The priors a model's samples are drawn from, one module per kind: its own (standard.py), a
Gaussian mixture fitted to its latents (gmm.py), and the learned priors the engine trains on them
(flow.py for continuous latents, tokens.py for a discrete latent's codes; learned.py and runs.py
hold what those two share). Each kind registers itself in registry.py, which the rest of imgvae asks."""

from imgvae.priors import flow, gmm, standard, tokens  # noqa: F401  (they register their kinds)
from imgvae.priors.registry import (
    KINDS,
    PriorKind,
    SampleOptions,
    Sampler,
    available,
    check_after_training,
    kind_of,
    learned_for,
    refuse,
    sampler,
)

__all__ = ["KINDS", "PriorKind", "SampleOptions", "Sampler", "available", "check_after_training", "kind_of",
           "learned_for", "refuse", "sampler"]
