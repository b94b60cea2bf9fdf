"""Optimizer and LR-schedule factories from OptimConfig: AdamW/Adam/SGD, cosine/step/none + warmup.

Schedules are one LambdaLR stepped once per optimizer step, so its state_dict is a few numbers
(resumable, weights_only-safe) and StepLR's "every N epochs" is exact with any accumulation.
"""

from __future__ import annotations

import math

import torch

from distrib.config import ConfigError, OptimConfig


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Only parameters with requires_grad: a linear probe's frozen backbone never reaches the optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            "the model has no trainable parameters (model.freeze_backbone froze everything?); "
            "check the model's head / forward_head"
        )
    return params


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as timm and most recipes do."""
    decay, no_decay = [], []
    for p in trainable_parameters(model):
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise ConfigError(f"optim.name={cfg.name!r} is not one of adamw, adam, sgd")


class _Schedule:
    """LR multiplier as a function of the optimizer step (picklable, unlike a closure)."""

    def __init__(self, cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
        self.kind = cfg.scheduler
        self.warmup = cfg.warmup_steps
        self.total = max(total_steps, 1)
        self.per_epoch = max(steps_per_epoch, 1)
        self.step_size = cfg.step_size
        self.gamma = cfg.gamma
        self.floor = cfg.min_lr / cfg.lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":  # StepLR in epochs
            return self.gamma ** ((step // self.per_epoch) // self.step_size)
        return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``steps_per_epoch`` / ``total_steps`` count optimizer steps of one process."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg, steps_per_epoch, total_steps))
