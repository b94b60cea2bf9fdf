"""The table of distrib's own model builders, apart from the package's ``build_model``.

A builder module registers itself here on import (``@register_model``), as timm's ``_registry`` does, so it
never imports the package that imports it (``distrib.models`` loads the builders lazily).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from distrib.config import ModelConfig

MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {}  # name -> builder(model_cfg) -> nn.Module


def register_model(fn: Callable[[ModelConfig], nn.Module] | None = None, *, name: str | None = None):
    """Register ``fn(model_cfg) -> nn.Module`` under ``name`` (default: the function's name).

    Usable bare (``@register_model``) or with a name (``@register_model(name="x")``).
    """

    def _add(f: Callable[[ModelConfig], nn.Module]):
        key = name or f.__name__
        if key in MODELS and MODELS[key] is not f:
            raise ValueError(f"model name '{key}' is registered twice ({MODELS[key]} and {f})")
        MODELS[key] = f
        return f

    return _add(fn) if fn is not None else _add
