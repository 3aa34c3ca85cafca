"""The kinds of prior a model's samples are drawn from, one module each (standard, gmm, flow, tokens),
each registering a PriorKind here; everything else asks the registry which kinds a latent takes,
which ones a model has and how each one draws: no module outside priors/ switches on a kind. A
model's priors are found from where it was read (io.paths.Provenance: open_model records it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from imgvae.config import PRIOR_CONFIGS, ConfigError, PriorConfig
from imgvae.models.registry import check_model

KINDS: dict[str, "PriorKind"] = {}
ALIASES = {"fitted": "gmm"}  # --prior fitted, as older versions named it


@dataclass(frozen=True)
class SampleOptions:
    """How a prior draws: noise scale T; a learned prior's steps (None: its own prior.steps), its ODE
    solver, its run folder (None: beside the model); a conditional prior's label sets (each a tuple
    of label names, given to the samples in turn; None: drawn as label_distribution says, "train":
    as in its training set, "none": no label) and classifier-free guidance W (None: its own
    prior.guidance; 0: unconditional, 1: plain conditional)."""

    temperature: float = 1.0
    steps: int | None = None
    solver: str | None = None
    prior_run: str | Path | None = None
    labels: tuple[tuple[str, ...], ...] | None = None
    label_distribution: str = "train"
    guidance: float | None = None


@dataclass(frozen=True)
class Sampler:
    """A prior of one model, ready to draw: draw(n, seed) -> [0, 1] images (n, 3, S, S), the same
    images for the same seed on any device. A conditional prior's labels (its vocabulary, the most
    frequent in its training set first) can be asked per call: sampler(n, seed, labels=(("cat",),))."""

    kind: str
    title: str
    draw: Callable[..., torch.Tensor]
    labels: tuple[str, ...] = ()
    label_spec: str | None = None  # the data.labels a conditional prior learned
    guidance: float | None = None  # the guidance it draws with

    def __call__(self, n: int, seed: int, labels: tuple[tuple[str, ...], ...] | None = None) -> torch.Tensor:
        return self.draw(n, seed, labels) if labels else self.draw(n, seed)


class PriorKind:
    """One kind of prior. Its config section (config.PRIOR_CONFIGS) says what it is: its title, the
    latents it models (discrete codes or continuous), whether the engine trains it. Subclasses say
    what it does: whether a model has one (`has`) and how it draws (`sampler`)."""

    name: str
    preference = 0  # `--prior auto` takes the available kind of highest preference

    @property
    def section(self) -> type[PriorConfig] | None:
        return PRIOR_CONFIGS.get(self.name)

    def title(self, discrete: bool) -> str:
        return self.section.title

    def models(self, discrete: bool) -> bool:
        """Whether this kind models a latent that is discrete (codes) or not."""
        return self.section.discrete == discrete

    def has(self, model, prior_run: str | Path | None = None) -> bool:
        """Whether the model (as open_model read it) has a prior of this kind, made and found where it lives."""
        raise NotImplementedError

    def sampler(self, model, options: SampleOptions) -> Callable[[int, int], torch.Tensor]:
        """draw(n, seed) for the model (on its device); CheckpointError when it has none."""
        raise NotImplementedError

    def check(self, cfg, model) -> None:
        """Refuse, before any work, a prior of this kind that the run's config and model (on the meta
        device will do) cannot have after training: one line naming the key."""
        refuse(self.name, model.discrete, "prior.after_training")

    def make(self, checkpoint: Path, *, device: str, progress: bool) -> str:
        """Make the prior of the run's final weights (prior.after_training) -> one line saying what was made."""
        raise NotImplementedError


def register(kind: PriorKind) -> PriorKind:
    """Add a kind; KINDS stays in order of preference (a model's own prior first)."""
    KINDS[kind.name] = kind
    ordered = sorted(KINDS.values(), key=lambda k: k.preference)
    KINDS.clear()
    KINDS.update((k.name, k) for k in ordered)
    return kind


def kind_of(name: str) -> PriorKind:
    name = ALIASES.get(name, name)
    if name not in KINDS:
        raise ConfigError(f"prior {name!r} is not one of {['auto', *KINDS]}")
    return KINDS[name]


def refuse(name: str, discrete: bool, what: str) -> None:
    """One line (`what` says who asked) when prior `name` cannot model this latent."""
    kind = kind_of(name)
    if not kind.models(discrete):
        fits = [k for k, v in KINDS.items() if v.section is not None and v.models(discrete)]
        latent = "a discrete latent (a grid of codes)" if discrete else "a continuous latent"
        raise ConfigError(f"{what}: the {kind.title(discrete)} ({name}) cannot model {latent}; for this model use "
                          f"{' or '.join(fits)}")


def check_after_training(cfg) -> None:
    """Refuse a config whose prior.after_training cannot be made for its model, before any work."""
    if cfg.prior.after_training:
        kind_of(cfg.prior.kind).check(cfg, check_model(cfg))


def learned_for(discrete: bool) -> PriorKind:
    """The kind `imgvae train-prior` trains for this latent: the token prior for codes, else the flow."""
    return next(k for k in KINDS.values() if k.section is not None and k.section.learned and k.models(discrete))


def available(model, prior_run: str | Path | None = None) -> list[str]:
    """The kinds of prior the model (as open_model read it) has, its own first."""
    discrete = model.discrete
    return [name for name, kind in KINDS.items() if kind.models(discrete) and kind.has(model, prior_run)]


def sampler(model, name: str = "auto", options: SampleOptions = SampleOptions()) -> Sampler:
    """Prior `name` of the model ("auto": the best it has, a learned prior over a fitted one over
    its own), ready to draw. A prior the latent cannot take, one the model does not have, or a
    learned prior of other weights is refused in one line."""
    if not options.temperature > 0:
        raise ConfigError(f"the temperature must be > 0, got {options.temperature}")
    discrete = model.discrete
    if name == "auto":
        kind = max((KINDS[k] for k in available(model, options.prior_run)), key=lambda k: k.preference)
    else:
        refuse(name, discrete, f"--prior {name}")
        kind = kind_of(name)
    draw = kind.sampler(model, options)
    if options.labels and not getattr(draw, "labels", None):
        raise ConfigError(f"--label: the {kind.title(discrete)} ({kind.name}) is not conditional; it takes no labels")
    return Sampler(kind.name, kind.title(discrete), draw, tuple(getattr(draw, "labels", ())),
                   getattr(draw, "label_spec", None), getattr(draw, "guidance", None))


def with_steps(options: SampleOptions, steps: int, solver: str | None = None,
               guidance: float | None = None) -> SampleOptions:
    """options with a learned prior's own steps, solver and guidance where they left them unset."""
    return replace(options, steps=options.steps or steps, solver=options.solver or solver,
                   guidance=options.guidance if options.guidance is not None else guidance)

