"""Optimizer and LR-schedule factories from OptimConfig, on timm's ``create_optimizer_v2`` / ``create_scheduler_v2``.

The no-decay rule is timm's: 1-D tensors and biases, plus every name a (sub)module lists in
``no_weight_decay()`` (ViT ``pos_embed``/``cls_token``, Swin ``relative_position_bias_table``), so a
wrapper such as the DINOv2 probe or GenConViT keeps its backbone's rule. Schedules step once per
optimizer step (``step_update``), so StepLR's "every N epochs" is exact with any accumulation, and an
lr is a pure function of (config, planned steps, step): a resume rebuilds it instead of unpickling it.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from distrib.config import ConfigError, OptimConfig

_TIMM_SCHEDULERS = {"cosine": "cosine", "step": "step", "none": "constant"}  # optim.scheduler -> timm's name


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Only parameters with requires_grad: a linear probe's frozen backbone never reaches the optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            "the model has no trainable parameters (model.freeze_backbone froze everything?); "
            "check the model's head / forward_head"
        )
    return params


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Every submodule's ``no_weight_decay()`` names, prefixed with its path in ``model``.

    timm reads only the top module's list; distrib's wrappers hold the timm backbone as a child.
    """
    names = set()
    for path, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            names.update(f"{path}.{n}" if path else n for n in module.no_weight_decay())
    return names


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    # the decayed group first, as checkpoints written before timm's grouping hold them
    return sorted(groups, key=lambda g: g["weight_decay"] == 0)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    trainable_parameters(model)  # a clear error when nothing is trainable
    if cfg.name not in ("adamw", "adam", "sgd"):
        raise ConfigError(f"optim.name={cfg.name!r} is not one of adamw, adam, sgd")
    # timm's "sgd" is Nesterov, which needs momentum > 0; "momentum" is plain SGD
    opt = "momentum" if cfg.name == "sgd" and cfg.momentum == 0 else cfg.name
    return create_optimizer_v2(
        model,
        opt,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,  # read by SGD only
        param_group_fn=lambda m: _param_groups(m, cfg.weight_decay),
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int
) -> Scheduler:
    """timm scheduler counted in optimizer steps of one process; call ``step_update(step)`` after each.

    Warmup: linear from lr/(warmup+1) to lr. Cosine then runs over the remaining ``total_steps`` down
    to ``optim.min_lr``; step decays by ``gamma`` every ``step_size`` epochs counted from step 0; none
    holds lr.
    """
    warmup = cfg.warmup_steps
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=_TIMM_SCHEDULERS[cfg.scheduler],
        num_epochs=max(total_steps - warmup, 1),
        decay_epochs=cfg.step_size * max(steps_per_epoch, 1),
        decay_rate=cfg.gamma,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.lr / (warmup + 1),
        warmup_epochs=warmup,
        warmup_prefix=cfg.scheduler == "cosine",
        step_on_epochs=False,
        updates_per_epoch=1,  # every length above is already in optimizer steps
    )
    return scheduler
