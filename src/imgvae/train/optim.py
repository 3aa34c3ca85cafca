"""Optimisation: the optimiser (with per-parameter learning rates) and the EMA update rule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.swa_utils import AveragedModel

from imgvae.config import TrainConfig

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
    # Fused Adam skips a step with a non-finite gradient on the device (found_inf): no host sync.
    adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether optimizer.step honours a `found_inf` flag (GradScaler's protocol) on the device:
    fused Adam, unless a checkpoint from before fused Adam loaded its unfused settings."""
    return all(group.get("fused") for group in optimizer.param_groups)


def step_if(optimizer: torch.optim.Optimizer, applied: torch.Tensor, step: Callable[[], object] | None = None) -> None:
    """step() (default: optimizer.step) where the bool tensor `applied` is true; else parameters and
    state stay as they were. Fused Adam skips on the device (found_inf; a GradScaler that is on passes
    its own); other optimisers step and are undone on CUDA (step_where); a CPU asks the host, which
    waits for nothing there and is cheaper than copying the state."""
    step = step or optimizer.step
    if skips_on_device(optimizer):
        optimizer.found_inf = (~applied).float()
        step()
    elif applied.device.type == "cuda":
        step_where(optimizer, step, applied)
    elif applied.item():
        step()


@torch.no_grad()
def step_where(optimizer: torch.optim.Optimizer, step, applied: torch.Tensor) -> None:
    """Call step(), then put back what it changed where the bool device tensor `applied` is false:
    a skipped step without a host sync, for optimizers with no fused form (RMSprop). Parameters
    and floating state on `applied`'s device are restored from copies; state the step created is
    set back to zeros, as RMSprop and Adam begin. A step counter kept on the CPU still counts."""
    def device_state() -> dict:
        return {(id(p), k): v for p, state in optimizer.state.items() for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and v.device == applied.device}
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    before = [p.clone() for p in params]
    state_before = {key: v.clone() for key, v in device_state().items()}
    step()
    for p, old in zip(params, before):
        p.copy_(torch.where(applied, p, old))
    for key, v in device_state().items():
        v.copy_(torch.where(applied, v, state_before[key] if key in state_before else torch.zeros_like(v)))


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module, decay: float, applied: torch.Tensor) -> None:
    """One EMA update of ema (parameters and buffers) towards model, where the bool tensor
    `applied` is true: the first copies, update n lerps by 1 - min(decay, (1 + n) / (10 + n))
    (TensorFlow's num_updates rule: a plain 0.999 would keep early, poor weights for thousands of
    steps, which short runs never get past). On the device: no host sync."""
    n = ema.n_averaged.double()
    weight = torch.where(n == 0, 1.0, 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay))
    weight = (weight * applied).float()
    averaged = list(ema.module.parameters()) + list(ema.module.buffers())
    current = list(model.parameters()) + list(model.buffers())
    floating = [i for i, t in enumerate(averaged) if torch.is_floating_point(t)]
    if floating:  # one weight per tensor: a lone tensor would be read on the host, as a Scalar
        torch._foreach_lerp_([averaged[i] for i in floating], [current[i].detach() for i in floating],
                             [weight] * len(floating))
    for a, c in zip(averaged, current):
        if not torch.is_floating_point(a):  # e.g. BatchNorm's batch counter: the latest
            a.copy_(torch.where(applied, c, a))
    ema.n_averaged += applied.to(ema.n_averaged.device)
