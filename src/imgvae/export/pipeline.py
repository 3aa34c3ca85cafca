"""An imgvae generator as a diffusers pipeline: an autoencoder (AutoencoderKL) and a flow-matching
prior over its latents (UNet2DModel, in diffusers' convention: timestep 1000 sigma, sigma 1 is
noise, the model predicts noise - data), driven by FlowMatchEulerDiscreteScheduler with Heun's
correction where asked, with classifier-free guidance for a prior conditional on labels.

This file needs only torch and diffusers: `imgvae export` copies it into the folder as
pipeline.py, which the folder's model_index.json names, so `DiffusionPipeline.from_pretrained(FOLDER,
trust_remote_code=True)` loads the generator where imgvae is not installed; with imgvae,
`ImgvaeFlowPipeline.from_pretrained(FOLDER)`.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


class ImgvaeFlowPipeline(DiffusionPipeline):
    """Images from noise: the prior's ODE in latent space from sigma 1 to 0 in num_inference_steps
    steps of 1 / num_inference_steps (Euler, or Heun but the last step), the latents taken back to
    the autoencoder's scale (latent_mean, latent_std per channel) and decoded. A conditional prior
    is told labels (names of id2label, one per image or a list per image: a multi-hot set) as the
    mean of their embeddings (label_embeddings; none: null_embedding), with guidance_scale W."""

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, vae, scheduler, latent_mean=None, latent_std=None, solver="heun",
                 num_inference_steps=32, guidance_scale=1.0, id2label=None, label_embeddings=None,
                 null_embedding=None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(latent_mean=latent_mean, latent_std=latent_std, solver=solver,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                id2label=id2label, label_embeddings=label_embeddings, null_embedding=null_embedding)

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """DiffusionPipeline.from_pretrained, without diffusers' notice that accelerate is missing: a
        model this small loads as fast without it."""
        if importlib.util.find_spec("accelerate") is None:
            kwargs.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """The folder's model_index.json, its class named as this class: the folder names the copy of
        this class in its pipeline.py (for DiffusionPipeline.from_pretrained), which this class is."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
        return loaded

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> id, as DiTPipeline's `labels`."""
        return {name: int(i) for i, name in (self.config.id2label or {}).items()}

    def conditions(self, class_labels, n: int, device) -> torch.Tensor | None:
        """(n, D) condition vectors of the labels asked (cycled over the images), None when unconditional."""
        if self.config.label_embeddings is None:
            if class_labels:
                raise ValueError("this pipeline's prior is not conditional: it takes no class_labels")
            return None
        table = torch.tensor(self.config.label_embeddings, dtype=torch.float32)
        null = torch.tensor(self.config.null_embedding, dtype=torch.float32)
        if not class_labels:
            return null.expand(n, -1).to(device)
        sets = [[c] if isinstance(c, (str, int)) else list(c) for c in class_labels]
        rows = []
        for labels in sets:
            unknown = [c for c in labels if isinstance(c, str) and c not in self.labels]
            if unknown:
                raise ValueError(f"{unknown[0]!r} is not a label of this pipeline: its labels are {list(self.labels)}")
            ids = [self.labels[c] if isinstance(c, str) else int(c) for c in labels]
            rows.append(table[ids].mean(0) if ids else null)
        return torch.stack([rows[i % len(rows)] for i in range(n)]).to(device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, guidance: float):
        """The prior's velocity (noise - data) at sigma (a scalar), guided: v_u + W (v_c - v_u)."""
        if cond is None or guidance == 1:
            return self.unet(x, sigma * 1000, class_labels=cond).sample
        null = torch.tensor(self.config.null_embedding, dtype=cond.dtype, device=cond.device).expand(len(x), -1)
        if guidance == 0:
            return self.unet(x, sigma * 1000, class_labels=null).sample
        both = self.unet(torch.cat([x, x]), sigma * 1000, class_labels=torch.cat([null, cond])).sample
        unconditional, conditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    @torch.no_grad()
    def __call__(self, num_images: int = 1, class_labels=None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, solver: str | None = None,
                 generator: torch.Generator | None = None, temperature: float = 1.0, output_type: str = "pil",
                 return_dict: bool = True):
        steps = num_inference_steps or self.config.num_inference_steps
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        solver = solver or self.config.solver
        device, side = self.unet.device, self.unet.config.sample_size
        shape = (num_images, self.unet.config.in_channels, side, side)
        x = (temperature * torch.randn(shape, generator=generator)).to(device)  # drawn on the CPU: any device
        cond = self.conditions(class_labels, num_images, device)
        self.scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], device=device)
        sigmas = self.scheduler.sigmas
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            v = self.velocity(x, sigmas[i], cond, guidance).float()
            if solver == "heun" and i + 1 < steps:  # the last step stays Euler
                ahead = x + (sigmas[i + 1] - sigmas[i]) * v
                v = 0.5 * (v + self.velocity(ahead, sigmas[i + 1], cond, guidance).float())
            x = self.scheduler.step(v, t, x).prev_sample
        mean = torch.tensor(self.config.latent_mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.latent_std, device=device).view(1, -1, 1, 1)
        images = (self.vae.decode(x * std + mean).sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images.cpu()
        else:
            result = images.cpu().permute(0, 2, 3, 1).numpy()
            result = self.numpy_to_pil(result) if output_type == "pil" else np.asarray(result)
        return ImagePipelineOutput(images=result) if return_dict else (result,)
