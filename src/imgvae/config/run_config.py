"""A run's whole config: one frozen, typed section per concern."""

from __future__ import annotations

from dataclasses import dataclass, field

from imgvae.config.model_sections import ModelConfig, SeedConfig
from imgvae.config.prior_sections import GMMConfig, PriorConfig
from imgvae.config.sections import DataConfig, EvalConfig, LossConfig, TrainConfig


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=SeedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prior: PriorConfig = field(default_factory=GMMConfig)

    @property
    def eval_batch_size(self) -> int:
        """Images per batch when evaluating or encoding: eval.batch_size, else train.batch_size."""
        return self.eval.batch_size or self.train.batch_size

    @property
    def eval_seed(self) -> int:
        """Seed of the evaluation's noise: eval.seed, else train.seed."""
        return self.train.seed if self.eval.seed is None else self.eval.seed
