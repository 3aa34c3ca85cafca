"""Second-stage priors as tasks of the engine, over latents encoded once (an `imgvae encode`
folder, memory-mapped) and kept resident on the device:

- FlowTask: continuous latents (posterior means and log-variances); each step draws a posterior
  sample z ~ q(z|x), noise and times, and takes the rectified-flow loss;
- TokenTask: a discrete latent's code grids; each step masks a share of every grid and takes
  MaskGIT's cross-entropy.

The engine brings the rest: checkpoints, resume, preemption, time limit, precision, compile,
DDP, EMA, records.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from imgvae.config import PriorConfig, TrainConfig, to_dict
from imgvae.models.base import VAE
from imgvae.models.flow import FlowPrior, draw_times, flow_loss
from imgvae.models.generate import decode, decode_codes
from imgvae.models.tokens import TokenPrior, token_loss
from imgvae.runtime import Processes, RunError
from imgvae.train.task import Micro

SAMPLES_SHOWN = 16  # the per-epoch picture: decoded samples of the prior being trained


class LatentBatches:
    """Rows (N, ...) resident on the device, in an order drawn per (seed, epoch); process r of W
    takes positions r, r + W, ... (as DistributedSampler)."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, procs: Processes):
        self.rows, self.batch_size, self.seed, self.procs, self.wait = rows, batch_size, seed, procs, 0.0
        self.per_epoch = len(rows) // (batch_size * procs.world_size)
        if self.per_epoch == 0:
            raise RunError(f"{len(rows)} latents are fewer than one global batch (prior.batch_size={batch_size} x "
                           f"{procs.world_size} processes): lower prior.batch_size")

    def start_epoch(self, epoch: int, batches_done: int) -> None:
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        self.mine = order[self.procs.rank::self.procs.world_size].to(self.rows.device)
        self.done = batches_done

    def __len__(self) -> int:
        return self.per_epoch - self.done

    def __iter__(self):
        for b in range(self.done, self.per_epoch):
            yield self.rows[self.mine[b * self.batch_size:(b + 1) * self.batch_size]]

    def summary(self) -> dict:
        return {"latents": len(self.rows)}


def prior_recipe(run: TrainConfig, cfg: PriorConfig) -> TrainConfig:
    """The engine's recipe for a learned prior: AdamW at prior.lr, a constant learning rate, EMA,
    clipping; device, precision, seed and the run's other settings as the autoencoder's run."""
    return TrainConfig(**{**asdict(run), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                          "ema": cfg.ema, "optimizer": "adamw", "lr_gamma": 1.0, "weight_decay": 0.0,
                          "betas": (0.9, 0.99), "grad_clip": 1.0, "grad_accum": 1, "freeze_encoder": False,
                          "channels_last": False, "ckpt_every": 0, "log_every": 20})


def resident(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows on the device when they fit in half its free memory (a CPU: they are in RAM anyway);
    else pinned, and each batch is copied there."""
    fits = device.type != "cuda" or rows.nbytes < torch.cuda.mem_get_info(device)[0] / 2
    return rows.to(device) if fits else rows.pin_memory()


class LatentTask:
    """What the two priors share: the latents folder, the global batch's random numbers, the
    per-epoch picture of decoded samples, the records. Subclasses read their rows, build their
    model, draw their inputs, take their loss and sample."""

    adversary, epochs_key = None, "prior.epochs"

    def __init__(self, cfg: PriorConfig, tc: TrainConfig, procs: Processes, latents: Path, source: dict,
                 autoencoder: VAE | None = None):
        self.cfg, self.tc, self.procs, self.device = cfg, tc, procs, procs.device
        self.latents, self.source, self.autoencoder = Path(latents), source, autoencoder
        self.picture_columns = int(math.sqrt(SAMPLES_SHOWN))
        self.valid = np.load(self.latents / "valid.npy")

    def config_dict(self) -> dict:
        """The run's config; `backbone` is the one built (old runs' "auto" meant the UNet)."""
        return {"kind": self.kind, "source": self.source, "latents": str(self.latents),
                "latent_shape": list(self.latent_shape), "backbone": self.model.backbone,
                "prior": to_dict(self.cfg), "train": to_dict(self.tc)}

    def generator(self, micro: Micro) -> torch.Generator:
        """The step's random numbers, drawn for the global batch from (seed, step): any process count."""
        return torch.Generator(self.device).manual_seed(self.tc.seed * 1_000_003 + micro.step)

    def positions(self, n: int, micro: Micro) -> torch.Tensor:
        """This process's rows of the global batch's random numbers."""
        return self.procs.rank + self.procs.world_size * (micro.index * self.tc.batch_size
                                                          + torch.arange(n, device=self.device))

    @property
    def total(self) -> int:
        return self.tc.batch_size * self.tc.grad_accum * self.procs.world_size

    def batches(self) -> LatentBatches:
        self.rows = resident(self.read_rows(), self.device)
        return LatentBatches(self.rows, self.tc.batch_size, self.tc.seed, self.procs)

    def batch_size(self, inputs: dict) -> int:
        return len(next(iter(inputs.values())))

    def adversary_pair(self, inputs, output):
        raise NotImplementedError  # a prior has no adversary

    def train_mode(self, model) -> None:
        model.train()

    def loss(self, inputs: dict, output: torch.Tensor, micro: Micro) -> tuple[torch.Tensor, dict]:
        loss = output.float()
        return loss, {"loss": loss.detach()}

    def end_epoch(self, model, epoch: int) -> tuple[dict, dict]:
        """Every tenth of the run (and at its end): its samples, decoded."""
        every = max(1, self.tc.epochs // 10)
        if self.autoencoder is None or (epoch % every and epoch != self.tc.epochs):
            return {}, {}
        model.eval()
        images = self.draw(model)
        model.train()
        return {}, {"samples": images}

    def describe(self) -> str:
        return (f"{len(self.rows):,} latents of shape {self.latent_shape} from {self.source['path']}; "
                f"{self.model.backbone} backbone")

    def summary(self, out: Path) -> dict:
        return {"kind": self.kind, "latents": len(self.rows), "source": self.source}

    def likely_keys(self) -> str:
        return f"prior.lr={self.cfg.lr:g}, prior.batch_size={self.cfg.batch_size}, prior.width={self.cfg.width}"


class FlowTask(LatentTask):
    """Train a FlowPrior on the latents in `latents` (an `imgvae encode` folder with logvar.npy)
    of the autoencoder `source` describes ({"path", "weights_sha256", ...})."""

    name, kind = "flow prior", "flow"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latent_shape = tuple(np.load(self.latents / "latents.npy", mmap_mode="r").shape[1:])

    def read_rows(self) -> torch.Tensor:
        """(mean, logvar) rows (N, 2, *latent_shape)."""
        mean = np.load(self.latents / "latents.npy", mmap_mode="r")
        logvar = np.load(self.latents / "logvar.npy", mmap_mode="r")
        return torch.stack([torch.from_numpy(np.asarray(a[self.valid])) for a in (mean, logvar)], 1)

    def build_model(self, fresh: bool) -> FlowPrior:
        prior = FlowPrior(self.cfg, self.latent_shape)
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
        batch = batch.to(self.device, non_blocking=True)
        at = self.positions(len(batch), micro)
        z = batch[:, 0] + torch.exp(0.5 * batch[:, 1]) * eps[at]
        return {"z": z, "noise": noise[at], "t": t[at]}

    def forward(self, model, inputs: dict) -> torch.Tensor:
        return flow_loss(model, inputs["z"], inputs["noise"], inputs["t"])

    def begin(self) -> None:
        self.shown_noise = torch.randn(SAMPLES_SHOWN, *self.latent_shape, generator=torch.Generator().manual_seed(0))

    def draw(self, model: FlowPrior) -> torch.Tensor:
        return decode(self.autoencoder, model.sample(self.shown_noise.to(self.device), self.cfg.steps,
                                                     self.cfg.solver))


class TokenTask(LatentTask):
    """Train a TokenPrior on the code grids (tokens.npy) in `latents` of the discrete autoencoder
    `source` describes, whose codebook has `codebook_size` codes."""

    name, kind = "token prior", "tokens"

    def __init__(self, *args, codebook_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.codebook_size = codebook_size
        self.latent_shape = tuple(np.load(self.latents / "tokens.npy", mmap_mode="r").shape[1:])

    def read_rows(self) -> torch.Tensor:
        """Code grids (N, h, w), int64."""
        tokens = np.load(self.latents / "tokens.npy", mmap_mode="r")
        return torch.from_numpy(np.asarray(tokens[self.valid]).astype(np.int64))

    def build_model(self, fresh: bool) -> TokenPrior:
        self.model = TokenPrior(self.cfg, self.latent_shape, self.codebook_size).to(self.device)
        return self.model

    def inputs(self, batch: torch.Tensor, micro: Micro) -> dict:
        """Code grids -> them, each one's progress r ~ U(0, 1) and its positions' scores (which
        are masked), drawn for the global batch and indexed by this process's positions."""
        generator = self.generator(micro)
        r = torch.rand(self.total, generator=generator, device=self.device)
        scores = torch.rand(self.total, math.prod(self.latent_shape), generator=generator, device=self.device)
        at = self.positions(len(batch), micro)
        return {"tokens": batch.to(self.device, non_blocking=True), "r": r[at], "scores": scores[at]}

    def forward(self, model, inputs: dict) -> torch.Tensor:
        return token_loss(model, inputs["tokens"], inputs["r"], inputs["scores"])

    def begin(self) -> None:
        pass

    def draw(self, model: TokenPrior) -> torch.Tensor:
        codes = model.sample(SAMPLES_SHOWN, self.cfg.steps, torch.Generator().manual_seed(0), self.device)
        return decode_codes(self.autoencoder, codes)
