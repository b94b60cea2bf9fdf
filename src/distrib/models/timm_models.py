"""timm backbones behind one uniform interface (TimmClassifier) and pretrained loading.

Two sources: ``model.pretrained_file``, a local file handed to timm through
``pretrained_cfg_overlay=dict(file=...)`` with every remote source blanked out; or ``model.pretrained``,
timm's own source for the name (the Hugging Face hub and its cache, honouring ``HF_HOME``,
``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``), exactly as ``timm.create_model(name, pretrained=True)``.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from distrib.config import ConfigError, ModelConfig
from distrib.errors import DistribError


def hub_cache_hint(name: str) -> str:
    """Where timm's hub weights for ``name`` live in the Hugging Face cache (HF_HOME/hub by default)."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - a name without a pretrained tag; the message still names the cache
        cfg = None
    repo = getattr(cfg, "hf_hub_id", None) or f"timm/{name}"
    return os.path.join(constants.HF_HUB_CACHE, "models--" + repo.split("@")[0].replace("/", "--"))


def _hub_error(name: str, key: str, e: Exception) -> DistribError:
    return DistribError(
        f"could not load timm's pretrained weights for '{name}' ({key}, model.pretrained: true): "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Looked in the Hugging Face cache at "
        f"{hub_cache_hint(name)} (HF_HOME/HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads only the cache, HF_ENDPOINT picks a "
        f"mirror; set HF_HUB_OFFLINE=1 on a machine without internet so this fails at once instead of retrying). "
        f"Three ways out: set model.pretrained_file=/path/to/weights.safetensors (a local file); pre-fetch into "
        f"the cache on a connected machine with "
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy its HF_HOME here; or "
        f"set model.pretrained=false to train from random init"
    )


def _one_line(e: Exception) -> str:
    """torch's load_state_dict error lists every mismatched tensor on its own line (hundreds for another
    architecture); the user needs the count and the first one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{len(lines) - 1} tensors do not fit, the first: {lines[1].rstrip('.')}"


def create_timm(
    name: str, pretrained_file: str = "", key: str = "model.name", pretrained: bool = False, **kwargs
) -> nn.Module:
    """``timm.create_model`` with random init, weights from a local file, or (``pretrained``, when no
    file is given) timm's own pretrained source through the Hugging Face hub cache.

    ``key`` names the config entry in error messages. Bad keyword arguments (e.g. ``img_size`` on a
    convnet) become a ConfigError instead of a bare TypeError.
    """
    import timm

    from distrib.models.weights import resolve_pretrained_file

    pretrained_file = resolve_pretrained_file(pretrained_file, name)  # pkg:NAME -> an imported file
    hub = pretrained and not pretrained_file
    pretrained = bool(pretrained_file) or hub
    extra: dict = {}
    if pretrained_file:
        path = os.path.abspath(os.path.expanduser(pretrained_file))
        if not os.path.isfile(path):
            raise ConfigError(
                f"pretrained weights file not found: {path} (for {key}='{name}'); "
                "download it on a machine with internet access and copy it here, or set "
                "model.pretrained_file='' for random init"
            )
        # Blank every remote source so timm can only read the local file (no hub, no URL).
        extra["pretrained_cfg_overlay"] = dict(file=path, url=None, hf_hub_id=None, hf_hub_filename=None, source=None)
    try:
        with _capture_key_report() as report:
            model = timm.create_model(name, pretrained=pretrained, **extra, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"timm model '{name}' ({key}) rejected keyword arguments {sorted(kwargs)}: {e}. "
            "Remove them from model.kwargs, or set model.img_size=0 for models without a "
            "fixed token grid (convnets)"
        ) from e
    except Exception as e:  # noqa: BLE001 - the hub raises OSError/HTTP/offline errors of several kinds
        if hub:
            raise _hub_error(name, key, e) from e
        if not pretrained or not isinstance(e, (RuntimeError, KeyError, ValueError)):
            raise
        raise DistribError(
            f"could not load pretrained weights from {extra['pretrained_cfg_overlay']['file']} "
            f"into timm model '{name}': {_one_line(e)}. The file must be a timm/PyTorch state dict "
            "(.pth/.bin/.safetensors) of the same architecture"
        ) from e
    if pretrained:
        _check_loaded(
            model,
            name,
            extra["pretrained_cfg_overlay"]["file"] if pretrained_file else f"the hub cache {hub_cache_hint(name)}",
            report,
        )
    return model


class _KeyReport(logging.Handler):
    """Collects the missing/unexpected keys timm logs after its (non-strict) pretrained load."""

    _pattern = re.compile(r"(Missing|Unexpected) keys \((.*)\) (discovered|found)", re.S)

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self._pattern.match(record.getMessage())
        if m:
            keys = [k.strip() for k in m.group(2).split(",") if k.strip()]
            (self.missing if m.group(1) == "Missing" else self.unexpected).extend(keys)


def _report_logger() -> str:
    from timm.models import load_pretrained

    return load_pretrained.__module__


def _timm_version() -> str:
    import timm

    return timm.__version__


@contextmanager
def _capture_key_report():
    """Listen on the logger of timm's ``load_pretrained`` (its module's, as timm names loggers), not a fixed
    private module path. No public timm API returns these keys from the adapting load that ``create_model``
    runs (head drop, ``filter_fn`` resampling of pos_embed / Swin tables, in_chans); ``load_checkpoint``
    returns them but skips that adaptation (docs/DESIGN.md, library internals)."""
    logger = logging.getLogger(_report_logger())
    handler, level = _KeyReport(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _check_loaded(model: nn.Module, name: str, path: str, report: _KeyReport) -> None:
    """Fail when the file did not cover the backbone.

    timm loads non-strictly whenever our head size differs from the checkpoint's (always, for 1 or 2
    logits), so a file for another architecture would otherwise leave the model silently random.
    """
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    in_head = [k for k in model.state_dict() if any(k.startswith(h + ".") for h in heads)]
    if (
        in_head
        and getattr(model, "num_classes", None) != model.pretrained_cfg.get("num_classes")
        and not report.missing
    ):
        # timm dropped the file's head, so it must have reported the head's keys missing: a silent report
        # means its log message or logger moved, and a wrong file would go unnoticed
        raise DistribError(
            f"timm {_timm_version()} loaded '{name}' without its 'Missing keys (...)' report on logger "
            f"{_report_logger()}; distrib cannot verify the pretrained load (models/timm_models.py, "
            "_KeyReport). Use the timm version in constraints.txt"
        )
    missing = [k for k in report.missing if not any(k.startswith(h + ".") for h in heads)]
    if missing:
        raise DistribError(
            f"pretrained file {path} does not hold weights for timm model '{name}': "
            f"{len(missing)} tensors missing (e.g. {', '.join(missing[:5])}); "
            f"{len(report.unexpected)} unexpected. Use a checkpoint of this exact architecture"
        )


class TimmClassifier(nn.Module):
    """A timm model with distrib's interface: pooled embedding, separate head, uniform dropout.

    timm models put classifier dropout in different places; the wrapped model is built with
    ``drop_rate=0`` and dropout is applied here, directly before the classifier, so that
    ``forward(x) == forward_head(forward_features(x))`` holds for every architecture.
    """

    def __init__(self, model: nn.Module, drop_rate: float = 0.0):
        super().__init__()
        self.model = model
        self.head_drop = nn.Dropout(drop_rate)
        classifier = model.get_classifier()
        if not isinstance(classifier, nn.Module):
            raise ConfigError(
                f"timm model {type(model).__name__} has no single classifier module "
                f"(got {type(classifier).__name__}); choose another model.name"
            )
        # head_hidden_size is the pre-logits width when a model has a conv/MLP head (MobileNetV4: 1280).
        self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)

    @property
    def pretrained_cfg(self) -> dict:
        """timm's data config (mean/std/input size) for transforms that resolve normalization."""
        return dict(self.model.pretrained_cfg)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def head_modules(self) -> list[nn.Module]:
        """Modules that belong to the head (they keep training in a linear probe)."""
        return [self.head_drop, self.model.get_classifier()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-head embedding [B, num_features]."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(self.head_drop(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_timm_classifier(model_cfg: ModelConfig) -> TimmClassifier:
    """Build ``model_cfg.name`` from timm with a ``num_classes``-logit head (1 = BCE, 2 = CE)."""
    kwargs = dict(model_cfg.kwargs)
    reserved = {
        "num_classes": "model.num_classes",
        "pretrained": "model.pretrained or model.pretrained_file",
        "drop_rate": "model.drop_rate",
        "img_size": "model.img_size",
    }
    for k, use in reserved.items():
        if k in model_cfg.kwargs:
            raise ConfigError(f"model.kwargs.{k} is set by distrib; use {use} instead")
    if model_cfg.img_size:
        kwargs["img_size"] = model_cfg.img_size
    model = create_timm(
        model_cfg.name,
        model_cfg.pretrained_file,
        pretrained=model_cfg.pretrained,
        num_classes=model_cfg.num_classes,
        **kwargs,
    )
    if not (model_cfg.pretrained_file or model_cfg.pretrained) or model_cfg.num_classes != model.pretrained_cfg.get(
        "num_classes"
    ):
        _reset_head(model.get_classifier())  # the head is fresh (timm drops a file's head of another size)
    return TimmClassifier(model, drop_rate=model_cfg.drop_rate)


def _reset_head(head: nn.Module) -> None:
    """Re-draw a fresh linear head small: trunc-normal(std 0.01) weights, zero bias.

    Why: timm's EfficientNet/MobileNet init draws the classifier from U(+-1/sqrt(num_classes)), i.e.
    U(-1, 1) for one logit; over 1280-1536 features that gives initial logits with std ~7-11 and a
    first-epoch BCE of ~4-7, and the first few hundred steps go into shrinking the head.
    """
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
