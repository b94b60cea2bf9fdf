"""Model registry: one ``build_model(cfg.model)`` reaches registered distrib models and any timm name.

Registered builders take the ``ModelConfig`` and return a plain ``nn.Module`` exposing
``forward``, ``forward_features``, ``forward_head``, ``get_classifier`` and ``num_features``.
Wrapping (the linear-probe freeze) happens here, outside the model classes.

Public face: ``build_model(cfg.model)``, ``register_model``, ``list_models``; ``measure.cpu_latency_ms``
and ``measure.model_size_mb`` (what a model costs to deploy).
"""

from __future__ import annotations

import difflib

import torch.nn as nn

from distrib.config import ConfigError, ModelConfig
from distrib.models.registry import MODELS as _REGISTRY
from distrib.models.registry import register_model


def list_models() -> list[str]:
    """Names registered by distrib itself (any timm name is accepted on top of these)."""
    _import_builtin_models()
    return sorted(_REGISTRY)


def _import_builtin_models() -> None:
    # Imported lazily so `import distrib.models` does not pull timm backbones until needed.
    from distrib.models import genconvit  # noqa: F401  (registers genconvit_ed / genconvit_vae)


def _closest_names(name: str, n: int = 5) -> list[str]:
    import timm

    candidates = set(_REGISTRY) | set(timm.list_models()) | set(timm.list_pretrained())
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.5) or difflib.get_close_matches(
        name, sorted(candidates), n=n, cutoff=0.0
    )


def check_model_name(name: str) -> None:
    """Raise ConfigError for a name that is neither registered nor a timm model (or timm tag)."""
    import timm

    _import_builtin_models()
    if name in _REGISTRY:
        return
    arch, _, tag = name.partition(".")
    known = timm.is_model(arch) and (not tag or name in timm.list_pretrained(f"{arch}.*"))
    if not known:
        close = ", ".join(_closest_names(name))
        what = (
            f"unknown pretrained tag '{tag}' for timm model '{arch}'"
            if timm.is_model(arch)
            else f"unknown model name '{name}'"
        )
        raise ConfigError(
            f"model.name: {what}; closest valid names: {close}. "
            f"Use a registered name ({', '.join(sorted(_REGISTRY))}) or any name from "
            f"timm.list_models()/timm.list_pretrained()."
        )


def build_model(model_cfg: ModelConfig) -> nn.Module:
    """Build the model named by ``model_cfg.name``; apply the linear-probe freeze if requested."""
    check_model_name(model_cfg.name)
    if model_cfg.name in _REGISTRY:
        model = _REGISTRY[model_cfg.name](model_cfg)
    else:
        from distrib.models.timm_models import build_timm_classifier

        model = build_timm_classifier(model_cfg)
    if model_cfg.freeze_backbone:
        from distrib.models.probe import freeze_backbone

        model = freeze_backbone(model)
    return model


# The optimizer receives only parameters with requires_grad (distrib.training.optim.trainable_parameters), so a
# linear probe's frozen backbone never reaches it.
__all__ = ["register_model", "build_model", "list_models", "check_model_name"]
