"""The prior section of a config, one class per kind of prior (prior.kind picks it, as model.name
picks the model's): what every prior has, a fitted Gaussian mixture's keys, and a learned prior's,
whose training recipe is its own (the engine's keys, with a prior's defaults). Each class also
says what the kind is to a reader (its title) and which latents it models; priors/ holds what it does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from imgvae.config.fields import ConfigError, key, like
from imgvae.config.sections import Recipe

POWERS_OF_TWO = [2**i for i in range(3, 12)]
OWN_PRIOR_TITLES = {False: "N(0, I)", True: "uniform codes"}  # a model's own prior, by whether its latent is discrete


@dataclass(frozen=True)
class PriorConfig:
    """What every prior section has."""

    title: ClassVar[str] = "prior"  # how pages and messages name the kind
    discrete: ClassVar[bool] = False  # it models a discrete latent's codes (else continuous latents)
    learned: ClassVar[bool] = False  # trained by the engine, in a run folder of its own beside the model

    kind: Literal["gmm", "flow", "tokens"] = key("gmm", help="gmm: a Gaussian (mixture) fitted to the training "
                                                 "latents (`imgvae fit-prior`); flow: a flow-matching model trained on "
                                                 "them, tokens: a discrete latent's masked-token model (`imgvae "
                                                 "train-prior` trains either)")
    after_training: bool = key(False, help="make it after the last epoch (the evaluation then scores its samples too)")

    def check(self) -> None:
        """The rules that tie a section's keys together (ConfigError naming the key, without its section)."""


@dataclass(frozen=True)
class GMMConfig(PriorConfig):
    """A Gaussian (mixture) fitted to the aggregate posterior of the training images."""

    title: ClassVar[str] = "fitted prior"

    images: int = key(10_000, ge=0, le=10**9, help="training images to encode, spread evenly over data.train (0 = "
                      "all)")
    components: int = key(1, gt=0, le=1000, help="Gaussians in the mixture (1 = one Gaussian with the exact "
                          "aggregate moments)")


@dataclass(frozen=True)
class LearnedPriorConfig(Recipe, PriorConfig):
    """A prior the engine trains on latents encoded once: its network's size, sampling steps, and its
    own training recipe (the engine's keys; AdamW, a constant learning rate, clipping and EMA by default)."""

    learned: ClassVar[bool] = True
    section: ClassVar[str] = "prior"

    width: int | Literal["auto"] = key("auto", help="the network's width: channels of a transformer or MLP, of the "
                                       "UNet's first level; a power of 2 from 8 to 2048 (auto: the backbone's own)")
    depth: int | Literal["auto"] = key("auto", gt=0, le=64, help="transformer or MLP blocks, UNet levels (auto: the "
                                       "backbone's own)")
    view_epochs: int = key(1, gt=0, le=1000, help="epochs of training views encoded once (random crops differ each "
                           "epoch; mirrored too when data.hflip)")
    steps: int = key(32, gt=0, le=10**4, help="sampling: ODE steps of a flow, decoding iterations of a token prior")
    label_dropout: float = key(0.1, ge=0, le=1, help="with labels (data.labels): the share of training examples "
                               "told no label, so that one network is conditional and unconditional (classifier-"
                               "free guidance)")
    guidance: float = key(1.0, ge=0, le=100, help="sampling a conditional prior: classifier-free guidance W, v_u + "
                          "W (v_c - v_u) (0: unconditional, 1: plain conditional)")
    epochs: int = like(Recipe, "epochs", 200)
    batch_size: int = like(Recipe, "batch_size", 128)
    optimizer: Literal["rmsprop", "adam", "adamw"] = like(Recipe, "optimizer", "adamw")
    betas: tuple[float, float] = like(Recipe, "betas", (0.9, 0.99))
    lr_gamma: float = like(Recipe, "lr_gamma", 1.0)
    seed: int | None = key(None, ge=0, le=2**31 - 1, help="seed of the prior's training (null: the autoencoder "
                           "run's train.seed)")
    ckpt_every: int = like(Recipe, "ckpt_every", 0)
    grad_clip: float = like(Recipe, "grad_clip", 1.0)
    ema: float = like(Recipe, "ema", 0.999)

    def check(self) -> None:
        super().check()
        if self.width != "auto" and self.width not in POWERS_OF_TWO:
            raise ConfigError(f"width must be auto or a power of 2 from 8 to 2048, got {self.width}")


@dataclass(frozen=True)
class FlowConfig(LearnedPriorConfig):
    """A flow-matching (rectified-flow) model of continuous latents."""

    title: ClassVar[str] = "flow prior"

    kind: Literal["gmm", "flow", "tokens"] = like(PriorConfig, "kind", "flow")
    backbone: Literal["auto", "transformer", "unet", "mlp"] = key("auto", help="the velocity network: unet "
                                                                  "(diffusers' UNet2DModel) or transformer (over "
                                                                  "latent patches) for spatial latents, mlp for any; "
                                                                  "auto: the UNet for spatial latents, the MLP for "
                                                                  "flat ones")
    patch_size: int = key(2, gt=0, le=64, help="the transformer's latent patch side")
    time_sampling: Literal["logit-normal", "uniform"] = key("logit-normal", help="training times: logit-normal (most "
                                                            "weight mid-path, as SD3) or uniform")
    solver: Literal["euler", "heun"] = key("heun", help="the ODE solver when sampling (heun: second order, 2 "
                                           "evaluations a step)")
    align: float = key(0.0, ge=0, le=100, help="REPA: the weight of the alignment of a hidden layer of the "
                       "backbone (through a small projector, dropped at sampling) with EfficientNet-Lite0's features "
                       "of the clean image, added to the flow loss (0 = off; REPA: 0.5)")
    align_layer: int = key(1, ge=0, le=64, help="REPA: the hidden layer aligned: a UNet's down block (its mid "
                           "block after the last), a transformer's block, counted from 0")


@dataclass(frozen=True)
class TokenConfig(LearnedPriorConfig):
    """A masked-token transformer (MaskGIT) over a discrete latent's code grid."""

    title: ClassVar[str] = "token prior"
    discrete: ClassVar[bool] = True

    kind: Literal["gmm", "flow", "tokens"] = like(PriorConfig, "kind", "tokens")
    backbone: Literal["auto", "transformer"] = key("auto", help="a bidirectional transformer over the code grid "
                                                   "(auto: the same)")


# prior.kind -> its section. priors/ registers a kind under each name (a test checks that they agree).
PRIOR_CONFIGS: dict[str, type[PriorConfig]] = {"gmm": GMMConfig, "flow": FlowConfig, "tokens": TokenConfig}
