"""A learned prior in an autoencoder's latent space: a small denoiser trained with the
flow-matching (rectified-flow) objective. Noise x0 ~ N(0, I) and a normalised latent x1 are
joined by the straight path x_t = (1 - t) x0 + t x1; the network predicts its velocity
x1 - x0. Sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (a latent) with Euler
or Heun steps, then undoes the normalisation; the autoencoder's decoder draws the image. Its
velocity networks are in flow_net.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from imgvae.config import ConfigError, FlowConfig
from imgvae.metrics.features import RepresentationFeatures
from imgvae.models.base import VAE, inference
from imgvae.models.generate import decode
from imgvae.priors import flow_net
from imgvae.priors.condition import LabelEmbedding, guided
from imgvae.priors.latent_task import SAMPLES_SHOWN, LatentTask
from imgvae.priors.learned import LearnedPrior
from imgvae.priors.registry import SampleOptions, register
from imgvae.train.task import Micro

SOLVERS = ("euler", "heun")


class FlowPrior(nn.Module):
    """The velocity network of one autoencoder's latents, with their normalisation: latents
    are (z - mean) / std per channel while the flow sees them (buffers, saved with the weights).
    With a label vocabulary it is conditional: told a label set, or nothing (its null condition)."""

    def __init__(self, cfg: FlowConfig, latent_shape: tuple[int, ...], vocabulary: int = 0):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        channels = latent_shape[0]
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.backbone, self.velocity = flow_net.velocity_network(cfg, self.latent_shape, vocabulary > 0)
        self.condition = LabelEmbedding(vocabulary, self.velocity.cond_dim) if vocabulary else None
        self.projector = None
        if cfg.align > 0:  # REPA: a hidden layer's state, projected to the frozen network's features
            layer, channels = self.velocity.hidden_layers()[cfg.align_layer]
            layer.register_forward_hook(self._keep_hidden)
            self.projector = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1), nn.SiLU(),
                                           nn.Conv2d(4 * channels, 4 * channels, 1), nn.SiLU(),
                                           nn.Conv2d(4 * channels, RepresentationFeatures.CHANNELS, 1))

    def _keep_hidden(self, module: nn.Module, inputs, output) -> None:
        self._hidden = output

    def _channels(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (len(self.latent_shape) - 1)))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._channels(self.mean)) / self._channels(self.std)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._channels(self.std) + self._channels(self.mean)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                align: bool = False):
        """Velocity at normalised points x (B, *latent_shape), times t (B,), told multi-hot labels
        (B, L) or nothing; with align, also the aligned layer's projected state (B, 112, h', w').
        On a CPU, attention over the few latent positions takes the plain matmul kernel: PyTorch's
        flash kernel has a slow backward there in bf16, and is no faster in fp32
        (bench/prior_speed.py)."""
        cond = None if self.condition is None else self.condition(labels, len(x))
        if self.backbone == "mlp":
            return self.velocity(x.flatten(1), t, cond).view_as(x)
        on_cpu = x.device.type == "cpu" and flow_net.CPU_ATTENTION is not None
        with sdpa_kernel(flow_net.CPU_ATTENTION) if on_cpu else nullcontext():
            velocity = self.velocity(x, t, cond)
        if not align:
            return velocity
        grid = tuple(side // getattr(self.velocity, "patch", 1) for side in x.shape[-2:])
        return velocity, self.projector(flow_net.hidden_map(self._hidden, grid))

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int, solver: str = "heun", labels: torch.Tensor | None = None,
               guidance: float = 1.0) -> torch.Tensor:
        """Integrate the flow from noise (n, *latent_shape) at t = 0 to t = 1 in `steps` steps, told
        labels (n, L) with classifier-free guidance W (condition.guided) -> latents on the
        autoencoder's own scale, same device as the noise."""
        if solver not in SOLVERS:
            raise ConfigError(f"solver {solver!r} is not one of {list(SOLVERS)}")
        if steps < 1:
            raise ConfigError(f"the ODE needs at least 1 step, got {steps}")
        x, dt = noise.float(), 1.0 / steps

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided(lambda xs, told: self(xs, t.repeat(len(xs) // len(t)), told), x, labels, guidance).float()

        for i in range(steps):
            t = torch.full((len(x),), i * dt, device=x.device)
            v = velocity(x, t)
            if solver == "heun" and i + 1 < steps:  # the last step stays Euler: v at t = 1 is not trained on
                v = 0.5 * (v + velocity(x + dt * v, t + dt))
            x = x + dt * v
        return self.denormalise(x)


def flow_loss(prior: FlowPrior, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """The rectified-flow objective for latents z (B, *latent_shape) on the autoencoder's scale (told
    their labels, for a conditional prior): mean squared error between the predicted and the
    straight path's velocity."""
    x1 = prior.normalise(z)
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    xt = (1 - tt) * noise + tt * x1
    return (prior(xt, t, labels).float() - (x1 - noise)).pow(2).mean()


def aligned_flow_loss(prior: FlowPrior, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      labels: torch.Tensor | None, features: torch.Tensor, weight: float) -> dict:
    """flow_loss plus REPA's: minus the cosine similarity, per position, of the aligned layer's projected
    state and the frozen network's features (B, 112, g, g) of the clean images, resized to its grid,
    weighted. -> {"loss", "flow", "align"}."""
    x1 = prior.normalise(z)
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    velocity, projected = prior((1 - tt) * noise + tt * x1, t, labels, align=True)
    flow = (velocity.float() - (x1 - noise)).pow(2).mean()
    target = F.interpolate(features.float(), size=projected.shape[-2:], mode="bilinear", align_corners=False)
    align = -F.cosine_similarity(projected.float(), target, dim=1).mean()
    return {"loss": flow + weight * align, "flow": flow.detach(), "align": align.detach()}


def draw_times(n: int, sampling: str, generator: torch.Generator, device) -> torch.Tensor:
    """Training times t (n,): logit-normal (SD3's, most weight mid-path) or uniform on [0, 1]."""
    if sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(torch.randn(n, generator=generator, device=device))


def sample(model: VAE, prior: FlowPrior, n: int, seed: int, steps: int, solver: str = "heun",
           temperature: float = 1.0, batch_size: int = 64, labels: torch.Tensor | None = None,
           guidance: float = 1.0) -> torch.Tensor:
    """n images from a flow prior (on the model's device): noise drawn on the CPU from `seed` (the
    same images on any device), scaled by T, carried to latents by the ODE in `steps` steps (told
    labels (n, L) with guidance W, for a conditional prior), decoded. -> [0, 1] (n, 3, S, S)."""
    noise = temperature * torch.randn(n, *model.latent_shape, generator=torch.Generator().manual_seed(seed))
    told = [None] * n if labels is None else labels
    with inference(model) as device:
        images = [decode(model, prior.sample(chunk.to(device), steps, solver,
                                             None if labels is None else told[i:i + batch_size].to(device), guidance))
                  for i, chunk in zip(range(0, n, batch_size), noise.split(batch_size))]
    return torch.cat(images)


class FlowTask(LatentTask):
    """Train a FlowPrior on the latents in `latents` (an `imgvae encode` folder with logvar.npy)
    of the autoencoder `source` describes ({"path", "weights_sha256", ...})."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latent_shape = tuple(np.load(self.latents / "latents.npy", mmap_mode="r").shape[1:])

    def read_rows(self) -> torch.Tensor:
        """(mean, logvar) rows (N, 2, *latent_shape)."""
        mean = np.load(self.latents / "latents.npy", mmap_mode="r")
        logvar = np.load(self.latents / "logvar.npy", mmap_mode="r")
        return torch.stack([torch.from_numpy(np.asarray(a[self.valid])) for a in (mean, logvar)], 1)

    def build_model(self, fresh: bool) -> FlowPrior:
        prior = FlowPrior(self.cfg, self.latent_shape, len(self.vocabulary))
        if fresh:  # per-channel statistics of the aggregate posterior: Var[mu] + E[sigma^2]
            mean, logvar = self.rows[:, 0].double(), self.rows[:, 1].double()
            dims = [0] + list(range(2, mean.dim()))
            prior.mean.copy_(mean.mean(dims).float())
            prior.std.copy_((mean.var(dims) + logvar.exp().mean(dims)).sqrt().clamp(min=1e-6).float())
        self.model = prior.to(self.device)
        return self.model

    def inputs(self, batch: torch.Tensor, micro: Micro) -> dict:
        """(mean, logvar) rows -> a posterior sample, noise and times, drawn for the global batch
        and indexed by this process's positions."""
        generator, shape = self.generator(micro), (self.total, *self.latent_shape)
        eps = torch.randn(shape, generator=generator, device=self.device)
        noise = torch.randn(shape, generator=generator, device=self.device)
        t = draw_times(self.total, self.cfg.time_sampling, generator, self.device)
        at = self.positions(len(batch), micro)
        rows = batch.rows.to(self.device, non_blocking=True)
        z = rows[:, 0] + torch.exp(0.5 * rows[:, 1]) * eps[at]
        features = None if batch.features is None else batch.features.to(self.device, non_blocking=True)
        return {"z": z, "noise": noise[at], "t": t[at], "labels": self.labels_of(batch, generator, micro),
                "features": features}

    def forward(self, model, inputs: dict) -> torch.Tensor | dict:
        if inputs["features"] is not None:
            return aligned_flow_loss(model, inputs["z"], inputs["noise"], inputs["t"], inputs["labels"],
                                     inputs["features"], self.cfg.align)
        return flow_loss(model, inputs["z"], inputs["noise"], inputs["t"], inputs["labels"])

    def begin(self) -> None:
        self.shown_noise = torch.randn(SAMPLES_SHOWN, *self.latent_shape, generator=torch.Generator().manual_seed(0))

    def draw(self, model: FlowPrior) -> torch.Tensor:
        labels = self.shown_labels()
        return decode(self.autoencoder, model.sample(self.shown_noise.to(self.device), self.cfg.steps,
                                                     self.cfg.solver, labels, self.cfg.guidance))


class FlowKind(LearnedPrior):
    name, task, logvar = "flow", FlowTask, True

    def resolve(self, section: FlowConfig, model: VAE) -> FlowConfig:
        section = replace(section, backbone=flow_net.backbone_of(section, model.latent_shape))
        layers = flow_net.hidden_layer_count(section, model.latent_shape)
        if section.align and not layers:
            raise ConfigError("prior.align: the MLP of a flat latent has no spatial hidden state to align; use "
                              "prior.align=0")
        if section.align and section.align_layer >= layers:
            raise ConfigError(f"prior.align_layer: {section.align_layer} is not a layer of this {section.backbone} "
                              f"(its layers: 0 to {layers - 1})")
        return section

    def build(self, section: FlowConfig, latent_shape, model: VAE, vocabulary: int = 0) -> FlowPrior:
        return FlowPrior(replace(section, align=0.0), latent_shape, vocabulary)  # sampling needs no projector

    def draw(self, model: VAE, prior: FlowPrior, options: SampleOptions):
        return lambda n, seed, labels=None: sample(model, prior, n, seed, options.steps, options.solver,
                                                   options.temperature, labels=labels, guidance=options.guidance)


register(FlowKind())
