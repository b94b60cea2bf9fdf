"""Linear probe (EXP-006): a wrapper that freezes everything but the classifier head.

The freeze lives outside the model classes, as timm/DINOv2 linear-eval code does it: the wrapped
model keeps its own code and only the wrapper decides what trains. Frozen modules stay in eval mode
even during ``model.train()``, so BatchNorm statistics and dropout in the backbone never change.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from distrib.errors import DistribError


class LinearProbe(nn.Module):
    """Wraps a distrib model (TimmClassifier, GenConViT, ...) so that only ``get_classifier()`` trains.

    State-dict keys gain a ``model.`` prefix; a probe checkpoint is reloaded by building the same
    config (``model.freeze_backbone=true``), which ``train.load_run`` does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "get_classifier"):
            raise DistribError(
                f"{type(model).__name__} has no get_classifier(); the linear probe needs "
                "to know which module is the head"
            )
        self.model = model
        head = model.get_classifier()
        head_ids = {id(p) for p in head.parameters()}
        if not head_ids:
            raise DistribError(f"{type(model).__name__}.get_classifier() has no parameters to train")
        for p in model.parameters():
            p.requires_grad_(id(p) in head_ids)
        self.num_features = model.num_features

    @property
    def pretrained_cfg(self) -> dict:
        return self.model.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def train(self, mode: bool = True) -> LinearProbe:
        """Only the head follows ``mode``; the frozen backbone always stays in eval mode."""
        self.training = mode
        self.model.eval()
        for m in self._head_modules():
            m.train(mode)
        return self

    def _head_modules(self) -> list[nn.Module]:
        # A model may list extra parameter-free head modules (TimmClassifier's dropout) to follow mode.
        if hasattr(self.model, "head_modules"):
            return list(self.model.head_modules())
        return [self.model.get_classifier()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(feats)

    def forward(self, x: torch.Tensor):
        return self.model(x)


def freeze_backbone(model: nn.Module) -> LinearProbe:
    """Freeze all but the classifier head of ``model`` (applied by build_model for model.freeze_backbone)."""
    probe = LinearProbe(model)
    probe.train(True)
    return probe
