"""What an evaluation finds, as typed results: reconstruction, likelihood, latent health,
distribution distances, codebook health and each prior's generation scores, gathered in Metrics.
`to_dict` gives metrics.json (its keys as they have always been) and `from_dict` reads any
metrics.json back, older ones too. A field says how readers show it (`metric`: its label, its
format, which way is better); the printed table, the report, `compare` and TensorBoard iterate
the fields, so a new metric is a new field here and its computation, nothing else. No torch."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from imgvae.config.prior_sections import OWN_PRIOR_TITLES, PRIOR_CONFIGS


def metric(label: str, *, fmt: str = "{:.4f}", better: str | None = None, absent: str | None = None,
           summary: str | None = None, default=None, omit_none: bool = False):
    """A result field readers show: label, format of its value, "high" or "low" when one value is
    better than another (compare marks the best), the words shown when it is None, its name among
    a run's final figures (TensorBoard hparams) when it is one; omit_none: left out of
    metrics.json when None."""
    meta = {"label": label, "fmt": fmt, "better": better, "absent": absent, "summary": summary,
            "omit_none": omit_none}
    return field(default=default, metadata=meta)


def kept(default=None):
    """A field that is left out of metrics.json when it is None (older files lack it too)."""
    return field(default=default, metadata={"omit_none": True})


class Result:
    """A typed result: to_dict / from_dict through its fields, and the rows readers show."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, values: dict):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _typed(hints[k], v) for k, v in values.items() if k in names})

    def rows(self) -> list[tuple[str, str]]:
        """(label, text) of each field with a label, as the printed table and the report show them."""
        rows = []
        for f in dataclasses.fields(self):
            if "label" in f.metadata:
                rows.append((f.metadata["label"], shown(getattr(self, f.name), f.metadata)))
        return [(label, text) for label, text in rows if text is not None]


def shown(value, meta: typing.Mapping) -> str | None:
    """A field's value in words: a Spread as mean ± std; None as the field's absent words (or no row)."""
    if value is None:
        return meta.get("absent")
    if isinstance(value, Spread):
        return f"{meta['fmt'].format(value.mean)} ± {meta['fmt'].format(value.std)}"
    return meta["fmt"].format(value)


def _plain(value):
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _typed(tp, value):
    """A JSON value as the annotated type: results (and dicts of them) built, the rest as it is."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        return next((_typed(a, value) for a in args if a is not type(None)), value)
    if origin is dict and isinstance(value, dict) and isinstance(args[1], type) and issubclass(args[1], Result):
        return {k: args[1].from_dict(v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Result) and isinstance(value, dict):
        return tp.from_dict(value)
    return value


@dataclass(kw_only=True)
class Spread(Result):
    """A per-image metric's mean and standard deviation over the images."""

    mean: float
    std: float


@dataclass(kw_only=True)
class Reconstruction(Result):
    note: str = "posterior mean decoded, rounded to 8 bits; metrics on [0, 1] pixels, mean and std over images"
    mse: Spread = metric("MSE", better="low")
    psnr: Spread = metric("PSNR dB", better="high", summary="psnr")
    ssim: Spread = metric("SSIM", better="high", summary="ssim")
    ms_ssim: Spread | None = metric("MS-SSIM", better="high", absent="n/a (needs >= 161 px)")
    lpips: Spread | None = metric("LPIPS", better="low", absent="n/a (needs eval.lpips_weights)")


@dataclass(kw_only=True)
class Likelihood(Result):
    discretisation: str = ""
    neg_elbo_nats: float
    recon_nats: float
    kl_nats: float
    neg_elbo_bpd: float = metric("-ELBO bits/dim", better="low", summary="bits_per_dim")
    iw_samples: int
    neg_iw_nats: float
    neg_iw_bpd: float

    def rows(self) -> list[tuple[str, str]]:
        return [("-ELBO nats/image", f"{self.neg_elbo_nats:.1f} (recon {self.recon_nats:.1f} + KL "
                                     f"{self.kl_nats:.1f})"),
                *super().rows(),
                (f"-IW bound (K={self.iw_samples}) bits/dim", f"{self.neg_iw_bpd:.4f} ({self.neg_iw_nats:.1f} "
                                                               "nats/image)")]


@dataclass(kw_only=True)
class Latent(Result):
    dims: int
    active_units: int
    active_threshold: float
    kl_per_dim: list[float]
    posterior_mean_var: list[float]

    def rows(self) -> list[tuple[str, str]]:
        return [("active units", f"{self.active_units} / {self.dims} (Cov_x E[z|x] > {self.active_threshold})")]


@dataclass(kw_only=True)
class Distribution(Result):
    """Distances between feature sets of `images` held-out images and their reconstructions, and of
    `sample_images` prior samples and as many real images: each Fréchet distance with the KID of the
    same sets beside it (unbiased where the Fréchet distance is biased upwards at small n)."""

    note: str = ""
    images: int | None = kept()
    sample_images: int | None = kept()
    fd_effnet_recon: float = metric("fd_effnet of reconstructions", better="low", summary="fd_effnet_recon",
                                    default=math.nan)
    kid_effnet_recon: float | None = metric("KID (EfficientNet) of reconstructions", better="low", omit_none=True)
    fd_effnet_samples: float = metric("fd_effnet of samples, N(0, I)", better="low", default=math.nan)
    kid_effnet_samples: float | None = metric("KID (EfficientNet) of samples, N(0, I)", better="low",
                                              omit_none=True)
    fd_effnet_samples_fitted: float | None = metric("fd_effnet of samples, fitted prior", better="low",
                                                    omit_none=True)
    kid_effnet_samples_fitted: float | None = metric("KID (EfficientNet) of samples, fitted prior", better="low",
                                                     omit_none=True)
    fid_recon: float | None = metric("rFID (FID of reconstructions)", better="low", omit_none=True)
    kid_recon: float | None = metric("KID of reconstructions", better="low", omit_none=True)
    fid_samples: float | None = metric("FID of samples, N(0, I)", better="low", omit_none=True)
    kid_samples: float | None = metric("KID of samples, N(0, I)", better="low", omit_none=True)
    fid_samples_fitted: float | None = metric("FID of samples, fitted prior", better="low", omit_none=True)
    kid_samples_fitted: float | None = metric("KID of samples, fitted prior", better="low", omit_none=True)

    def rows(self) -> list[tuple[str, str]]:
        """Each distance by its name, with the images it rests on (older files: without)."""
        rows = []
        for name, value in self.to_dict().items():
            if name in ("note", "images", "sample_images"):
                continue
            n = self.images if name.endswith("_recon") else self.sample_images
            text = ("{:.4f}" if name.startswith("kid") else "{:.3f}").format(value)
            rows.append((name, text + (f" (n = {n})" if n else "")))
        return rows


@dataclass(kw_only=True)
class Codebook(Result):
    """A discrete latent's codebook over the whole evaluated set, and its rate."""

    note: str = "codes used over the whole set, not per batch"
    size: int
    used: int
    dead: int
    usage: float = metric("codebook usage over the set", better="high", summary="codebook_usage")
    perplexity: float
    tokens: int
    set_tokens: int | None = kept()
    bits_per_image: float = metric("bits per image (discrete latents: tokens x log2 codes)", fmt="{:.0f}",
                                   better="low", summary="bits_per_image")

    def rows(self) -> list[tuple[str, str]]:
        count = ""  # metrics written before set_tokens existed: no count
        if self.set_tokens is not None:
            per_code = self.set_tokens / self.size
            few = "; too few to see rare codes: more images count better" if per_code < 16 else ""
            count = f" ({per_code:.0f} tokens per code{few})"
        return [("codebook usage", f"{self.used} / {self.size} codes ({self.usage:.1%}) over the whole set{count}; "
                                   f"{self.dead} dead; perplexity {self.perplexity:.1f}"),
                ("bits per image", f"{self.bits_per_image:.0f} ({self.tokens} tokens x "
                                   f"{math.log2(self.size):.2f} bits)")]


@dataclass(kw_only=True)
class Scores(Result):
    """A set of images (a prior's samples, reconstructions, real images) against the training views."""

    fd_effnet: float = metric("fd_effnet vs training", fmt="{:.1f}", better="low")
    kid_effnet: float | None = metric("KID (EfficientNet) vs training", fmt="{:.4f}", better="low", omit_none=True)
    images: int | None = kept()  # the images scored (older files: without)
    precision: float = metric("precision", fmt="{:.2f}", better="high")
    recall: float = metric("recall", fmt="{:.2f}", better="high")
    memorised: float = metric("memorised share", fmt="{:.0%}", better="low")
    # A conditional prior's samples, each asked for a training view's labels (evaluation/steering.py).
    guidance: float | None = metric("guidance", fmt="{:g}", omit_none=True)
    label_metric: str | None = kept()  # "accuracy" (one label an image) or "mAP" (multi-hot)
    label_score: float | None = metric("did it draw what was asked", fmt="{:.2f}", better="high", omit_none=True)
    label_ceiling: float | None = metric("the classifier's own score on held-out real views", fmt="{:.2f}",
                                         omit_none=True)
    per_label: dict | None = kept()  # {label: {"fd_effnet", "images"}}

    def line(self) -> str:
        shown = [f for f in dataclasses.fields(self) if f.name in ("fd_effnet", "kid_effnet", "precision", "recall",
                                                                   "memorised") and getattr(self, f.name) is not None]
        text = ", ".join(f"{f.name} {f.metadata['fmt'].format(getattr(self, f.name))}" for f in shown)
        if self.images is not None:
            text += f" ({self.images} images)"
        if self.label_score is not None:
            text += (f"; label {self.label_metric} {self.label_score:.2f} (ceiling {self.label_ceiling:.2f}) at "
                     f"guidance {self.guidance:g}")
        return text


@dataclass(kw_only=True)
class Generation(Result):
    """Each prior's samples against `images` training views of `reference`, with the reconstruction
    floor and, when scored, real held-out images."""

    reference: list[str] = field(default_factory=list)
    images: int
    k: int
    floor: Scores
    held_out: Scores | None = kept()
    priors: dict[str, Scores] = field(default_factory=dict)

    def rows(self, discrete: bool = False) -> list[tuple[str, str]]:
        rows = [("generation", f"against {self.images} training views of {', '.join(self.reference)}; "
                               f"k = {self.k} nearest neighbours")]
        rows += [(f"  samples, {prior_title(name, discrete)}", s.line()) for name, s in self.priors.items()]
        rows.append(("  floor: reconstructions", self.floor.line()))
        if self.held_out is not None:
            rows.append(("  real held-out images", self.held_out.line()))
        return rows


def prior_title(kind: str, discrete: bool) -> str:
    """How pages name a kind of prior: its config section's title; a model's own prior by its latent."""
    return PRIOR_CONFIGS[kind].title if kind in PRIOR_CONFIGS else OWN_PRIOR_TITLES[discrete]


@dataclass(kw_only=True)
class Metrics(Result):
    """Everything `imgvae evaluate` measures of one model on one image set: metrics.json."""

    checkpoint: str | None = kept()
    images: int
    image_size: int
    sources: list[str]
    seed: int
    skipped_files: int
    reconstruction: Reconstruction
    likelihood: Likelihood
    latent: Latent
    distribution: Distribution
    samples_reference: dict | None = kept()  # {sources, images, held_out}
    prior: dict = field(default_factory=dict)  # {samples: what N(0, I) is, samples_fitted: the fitted prior}
    codebook: Codebook | None = kept()
    preprocessing: dict | None = kept()
    feature_weights: dict | None = kept()
    per_image: dict | None = kept()
    generation: Generation | None = kept()

    @property
    def discrete(self) -> bool:
        return self.codebook is not None

    def sections(self) -> list[Result]:
        """The results shown as rows, in the order of the table."""
        parts = [self.reconstruction, self.likelihood, self.latent, self.codebook, self.distribution]
        return [p for p in parts if p is not None]

    def summary(self) -> dict[str, float]:
        """The final figures of a run (TensorBoard hparams): every field marked with a summary name."""
        out = {}
        for part in self.sections():
            for f in dataclasses.fields(part):
                name, value = f.metadata.get("summary"), getattr(part, f.name)
                if name and value is not None:
                    out[name] = value.mean if isinstance(value, Spread) else value
        return out
