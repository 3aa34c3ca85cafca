"""The VAE as a task of the engine: its images, model, loss (with the perceptual and GAN
terms), each epoch's held-out loss and the seed's three pictures.

Every random choice of a step (flips, reparametrisation noise) is drawn for the global batch
from (seed, step, micro-batch) and each process takes its rows, so a run resumed mid-epoch, or
split over N processes, repeats the same computation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from imgvae import rundir
from imgvae.config import Config, LossConfig, TrainConfig, to_dict
from imgvae.data.datasets import BadFiles, ImageDataset, first_images
from imgvae.data.decode import normalize, to_model_input
from imgvae.io.paths import init_from
from imgvae.metrics.features import PerceptualDistance
from imgvae.models.base import VAE, Quantized, VAEOutput
from imgvae.models.generate import decode, prior_noise, reconstruct
from imgvae.models.losses import kl_weight, vae_loss
from imgvae.models.quantized import code_usage
from imgvae.models.registry import build_vae
from imgvae.train.adversary import Adversary
from imgvae.train.align import LatentAligner
from imgvae.train.batches import ImageBatches
from imgvae.train.processes import Processes, RunningMean
from imgvae.train.task import Micro, global_positions, step_generator


def step_randomness(cfg: TrainConfig, micro: Micro, n: int, latent_shape, procs: Processes):
    """(flip mask (n,), reparametrisation noise (n, *latent_shape)) for this process's n images
    in micro-batch `micro`, drawn for the step's global batch (task.step_generator): one process
    with a W * A times larger batch draws the same values. They are drawn on the training device
    (a copy from pageable host memory would make the host wait for the GPU every step), so CUDA
    runs draw other values than CPU runs."""
    device = procs.device
    generator = step_generator(cfg.seed, micro.step, device)
    total = cfg.batch_size * cfg.grad_accum * procs.world_size
    flips = torch.rand(total, generator=generator, device=device) < 0.5
    noise = torch.randn(total, *latent_shape, generator=generator, device=device)
    positions = global_positions(procs, micro, cfg.batch_size, n)
    return flips[positions], noise[positions]


@torch.no_grad()
def eval_loss(model: VAE, loader, dataset: ImageDataset, cfg: LossConfig, device, bad: BadFiles) -> dict[str, float]:
    """Mean loss over the held-out set, reconstructing from the posterior mean
    (deterministic); the KL term is exact."""
    model.eval()
    stats, codes = RunningMean(), None
    for images, _, bad_items in loader:
        bad.add(dataset, bad_items)
        if len(images) == 0:
            continue
        x = to_model_input(images, device)
        out = model(x, sample=False)
        stats.add(vae_loss(x, out, cfg)[1], len(images))
        if isinstance(out.posterior, Quantized):  # the codes used over the whole set, not per batch
            counts = torch.bincount(out.posterior.indices.flatten().long().cpu(), minlength=out.posterior.codebook_size)
            codes = counts if codes is None else codes + counts
    model.train()
    health = code_usage(codes) if codes is not None else {}
    return stats.means() | {f"codebook_{k}": health[k] for k in ("usage", "perplexity") if health}


# The keys that help a quantiser whose codes go out of use (the collapse warning names them).
COLLAPSE_KEYS = {"vq": "model.cosine=true, a lower model.codebook_dim, model.dead_code_threshold > 0, "
                       "model.diversity > 0",
                 "fsq": "model.diversity > 0, fewer model.fsq_levels", "lfq": "a smaller model.codebook_size"}


@dataclass
class VAEInputs:
    x: torch.Tensor  # (B, 3, S, S) normalised, flipped, on the device
    noise: torch.Tensor  # (B, *latent_shape) reparametrisation noise


class VAETask:
    """What `imgvae train` trains: cfg's model on cfg's images."""

    epochs_key = "train.epochs"

    def __init__(self, cfg: Config, procs: Processes):
        self.cfg, self.procs, self.device = cfg, procs, procs.device
        self.name, self.picture_columns = cfg.model.name, cfg.eval.grid_size
        self.perceptual, self.adversary, self.aligner, self.model = None, None, None, None

    def config_dict(self) -> dict:
        return to_dict(self.cfg)

    def batches(self) -> ImageBatches:
        self.data = ImageBatches(self.cfg, self.procs)
        return self.data

    def build_model(self, fresh: bool) -> VAE:
        cfg, tc = self.cfg, self.cfg.train
        model = build_vae(cfg)
        if fresh and cfg.model.pretrained:
            init_from(model, cfg.model.pretrained)
        model.to(self.device)
        if tc.freeze_encoder:
            for module in model.encoder_modules():
                module.requires_grad_(False)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.loss.perceptual > 0:
            self.perceptual = PerceptualDistance().to(self.device)
        if cfg.loss.adversarial > 0:
            self.adversary = Adversary(cfg.loss, tc.precision, self.device, self.procs.world_size)
        if cfg.loss.align > 0:
            self.aligner = LatentAligner(cfg.loss.align, model, model.latent_shape[0], self.device)
        self.model = model
        return model

    # -- a micro-batch ----------------------------------------------------------------
    def inputs(self, images: torch.Tensor, micro: Micro) -> VAEInputs:
        """uint8 micro-batch -> normalised, flipped model input on the device, with its noise."""
        cfg = self.cfg
        flips, noise = step_randomness(cfg.train, micro, len(images), self.model.latent_shape, self.procs)
        x = to_model_input(images, self.device, flips if cfg.data.hflip else None)
        x = x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x
        return VAEInputs(x, noise)

    def batch_size(self, inputs: VAEInputs) -> int:
        return len(inputs.x)

    def forward(self, model: torch.nn.Module, inputs: VAEInputs) -> VAEOutput:
        return model(inputs.x, noise=inputs.noise)

    def loss(self, inputs: VAEInputs, output: VAEOutput, micro: Micro) -> tuple[torch.Tensor, dict]:
        weight = kl_weight(self.cfg.loss, micro.step, micro.total_steps)
        loss, stats = vae_loss(inputs.x, output.float(), self.cfg.loss, weight, self.perceptual)
        if self.aligner is not None:  # VA-VAE's alignment of the latent
            term, more = self.aligner.term(self.model, inputs.x, output.posterior.mean, loss)
            loss, stats = loss + term, stats | more | {"loss": (loss + term).detach()}
        return loss, stats

    def adversary_pair(self, inputs: VAEInputs, output: VAEOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, fake) images for the PatchGAN: the input and its reconstruction."""
        return inputs.x, output.x_hat.float()

    def train_mode(self, model: torch.nn.Module) -> None:
        model.train()
        if self.cfg.train.freeze_encoder:  # a frozen encoder's BatchNorm statistics stay as they were too
            for module in self.model.encoder_modules():
                module.eval()

    # -- records ------------------------------------------------------------------------
    def begin(self) -> None:
        """Rank 0, before the first step: the grids' fixed images and noise."""
        n = self.cfg.eval.grid_size**2
        shown = self.data.eval_set if self.data.eval_set is not None else self.data.train_set
        self.fixed_images = first_images(shown, n)
        self.fixed_noise = prior_noise(self.model, n, seed=self.cfg.train.seed)

    def end_epoch(self, model: VAE, epoch: int) -> tuple[dict, dict]:
        """Rank 0: the held-out loss and the seed's three pictures."""
        data, stats = self.data, {}
        if data.eval_loader is not None:
            stats = eval_loss(model, data.eval_loader, data.eval_set, self.cfg.loss, self.device, data.bad_files)
        usage, floor = stats.get("codebook_usage"), getattr(self.cfg.model, "usage_warning", 0)
        if usage is not None and usage < floor:
            warnings.warn(f"epoch {epoch}: the held-out images use {usage:.1%} of the {model.codebook_size} codes, "
                          f"below model.usage_warning={floor:g} (codebook collapse: try "
                          f"{COLLAPSE_KEYS[self.cfg.model.quantizer]})", stacklevel=1)
        pictures = (self.fixed_images.float() / 255, reconstruct(model, normalize(self.fixed_images)),
                    decode(model, self.fixed_noise))
        return stats, dict(zip(rundir.GRID_KINDS, pictures))

    def describe(self) -> str:
        return self.data.describe()

    def summary(self, out) -> dict:
        return {**self.data.summary(), "grids": rundir.GRIDS}

    def resume_command(self, out) -> str:
        return f"imgvae train --resume {out}"

    def likely_keys(self) -> str:
        tc = self.cfg.train
        return (f"train.lr={tc.lr:g}, train.optimizer={tc.optimizer}, loss.beta={self.cfg.loss.beta:g}, "
                f"train.batch_size={tc.batch_size}")
