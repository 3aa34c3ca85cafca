"""A flow prior in diffusers' form. imgvae's flow runs from t = 0 (noise) to t = 1 (a latent) and
its UNet is given 1000 t; diffusers' flow-matching schedulers run sigma from 1 (noise) to 0 and
give the model 1000 sigma, expecting noise - data. So sigma = 1 - t, and the exported UNet is the
prior's own with two exact changes: its time embedding's first layer composed with the linear map
that takes the sinusoidal features of 1000 sigma to those of 1000 (1 - sigma) (a rotation per
frequency), and its output negated. A conditional prior's label embeddings go with the pipeline."""

from __future__ import annotations

import copy
import math

import torch

from imgvae.config import ConfigError
from imgvae.priors.flow import FlowPrior

TRAINING_STEPS = 1000  # the time scale both UNets see: imgvae's 1000 t, diffusers' 1000 sigma
NO_TOKEN_PIPELINE = ("export: the token prior (MaskGIT) has no diffusers model class or scheduler; export the "
                     "autoencoder alone with --prior none (a VQModel, where its quantiser allows)")


def exportable(prior) -> None:
    """One line when a learned prior has no diffusers form: the token prior (MaskGIT's transformer
    over codes has no diffusers class and no scheduler), a flow over a flat latent (an MLP), a
    transformer backbone (not one of diffusers' transformer classes)."""
    if not isinstance(prior, FlowPrior):
        raise ConfigError(NO_TOKEN_PIPELINE)
    if prior.backbone != "unet":
        raise ConfigError(f"export: a flow prior's {prior.backbone} backbone maps onto no diffusers model class; a "
                          "prior of diffusers' UNet (prior.backbone=unet, the default for spatial latents) exports")


def time_map(unet) -> torch.Tensor:
    """M (D, D) with features(TRAINING_STEPS - s) = M @ features(s) for the UNet's sinusoidal time
    features (diffusers' get_timestep_embedding with the UNet's flip and shift): per frequency w,
    sin(w (T - s)) = sin(wT) cos(ws) - cos(wT) sin(ws), cos(w (T - s)) = cos(wT) cos(ws) + sin(wT) sin(ws)."""
    cfg = unet.config
    dim = cfg.block_out_channels[0]
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - cfg.freq_shift))
    angle = TRAINING_STEPS * freqs
    sin_at, cos_at = (half, 0) if cfg.flip_sin_to_cos else (0, half)  # where each half sits
    m = torch.zeros(dim, dim, dtype=torch.float64)
    for k in range(half):
        s, c = sin_at + k, cos_at + k
        m[s, s], m[s, c] = -torch.cos(angle[k]), torch.sin(angle[k])
        m[c, s], m[c, c] = torch.sin(angle[k]), torch.cos(angle[k])
    return m


def diffusers_unet(prior):
    """The prior's UNet2DModel, taking diffusers' timestep and predicting diffusers' velocity."""
    exportable(prior)
    unet = copy.deepcopy(prior.velocity.net).float().eval()
    linear = unet.time_embedding.linear_1
    linear.weight.data = (linear.weight.data.double() @ time_map(unet)).float()
    unet.conv_out.weight.data.neg_()
    unet.conv_out.bias.data.neg_()
    return unet


def pipeline_config(prior, section, vocabulary: list[str]) -> dict:
    """The pipeline's own settings: the latent normalisation, the sampling recipe and, for a
    conditional prior, its labels and their embeddings (the null one too)."""
    config = {"latent_mean": prior.mean.tolist(), "latent_std": prior.std.tolist(), "solver": section.solver,
              "num_inference_steps": section.steps, "guidance_scale": section.guidance}
    if prior.condition is not None:
        config |= {"id2label": {str(i): name for i, name in enumerate(vocabulary)},
                   "label_embeddings": prior.condition.table.detach().float().tolist(),
                   "null_embedding": prior.condition.null.detach().float().tolist()}
    return config


def flow_scheduler():
    """diffusers' flow-matching Euler scheduler, unshifted: the pipeline sets sigmas 1 - i / steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAINING_STEPS, shift=1.0)
