"""Optimisation: the optimiser (with per-parameter learning rates) and the EMA update rule."""

from __future__ import annotations

import torch

from .config import TrainConfig

# The learned scalar decoder scale gets a 100x learning rate: Adam moves a single
# parameter by ~lr per step, so at 3e-4 sigma would need ~10^4 steps to fall from 1 to 0.1.
SCALE_LR_MULTIPLIER = 100.0


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    scale = getattr(model, "log_scale", None)
    params = [{"params": [p for p in model.parameters() if p is not scale and p.requires_grad]}]
    if scale is not None:
        params.append({"params": [scale], "lr": cfg.lr * SCALE_LR_MULTIPLIER})
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def ema_with_warmup(decay: float):
    """AveragedModel update with decay min(decay, (1 + n) / (10 + n)) after n updates
    (TensorFlow's num_updates rule): a plain 0.999 would keep early, poor weights for
    thousands of steps, which short runs never get past."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):  # e.g. BatchNorm's batch counter: keep the latest
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update
