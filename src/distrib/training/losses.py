"""Training losses: BCE (1 logit) / CE (2 logits) with label smoothing, GenConViT's reconstruction and
KL terms, knowledge distillation, and ``positive_prob`` that reads P(label=1) from either head type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from distrib.config import ConfigError, ModelConfig, TrainConfig
from distrib.errors import DistribError

LossFn = Callable[[object, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]


def _logits(output) -> torch.Tensor:
    return output["logits"] if isinstance(output, dict) else output


def positive_prob(logits) -> torch.Tensor:
    """P(label=1) as a [B] tensor from [B], [B, 1] (sigmoid) or [B, 2] (softmax) logits (or a model dict)."""
    logits = _logits(logits)
    if logits.ndim == 1:
        return torch.sigmoid(logits)
    if logits.ndim == 2 and logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.ndim == 2 and logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1]
    raise DistribError(
        f"positive_prob expects logits of shape [B], [B, 1] or [B, 2], got {tuple(logits.shape)}; "
        "set model.num_classes to 1 or 2"
    )


def classification_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """BCE-with-logits for one logit, cross-entropy for two; both with label smoothing.

    For BCE the smoothed target is ``y * (1 - ls) + ls / 2``, the two-class analogue of CE's smoothing,
    so a 1-logit and a 2-logit model see the same regularisation for the same ``train.label_smoothing``.
    """
    if logits.ndim == 2 and logits.shape[1] == 1:
        y = target.float() * (1.0 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), y)
    if logits.ndim == 2 and logits.shape[1] == 2:
        return F.cross_entropy(logits.float(), target.long(), label_smoothing=label_smoothing)
    raise DistribError(f"classification loss expects logits [B, 1] or [B, 2], got {tuple(logits.shape)}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dims, averaged over the batch."""
    per_sample = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(dim=1)
    return per_sample.mean()


def build_loss(train_cfg: TrainConfig, model_cfg: ModelConfig) -> LossFn:
    """``fn(output, target, images) -> (loss, parts)`` for the configured head and model.

    ``loss = cls_weight * classification [+ recon_weight * MSE(recon, images)] [+ kl_weight * KL]``;
    the reconstruction and KL terms apply only when their weight is > 0 and the model returns
    ``recon`` / ``mu`` + ``logvar`` (GenConViT). ``parts`` holds floats for logging.
    """
    ls = train_cfg.label_smoothing
    w_cls, w_rec, w_kl = train_cfg.cls_weight, train_cfg.recon_weight, train_cfg.kl_weight
    if model_cfg.num_classes not in (1, 2):
        raise ConfigError(f"model.num_classes={model_cfg.num_classes} has no loss; use 1 (BCE) or 2 (CE)")

    def loss_fn(output, target: torch.Tensor, images: torch.Tensor | None = None):
        logits = _logits(output)
        cls = classification_loss(logits, target, ls)
        loss = w_cls * cls
        parts = {"cls": float(cls.detach())}
        if w_rec > 0:
            if not isinstance(output, dict) or "recon" not in output:
                raise ConfigError(
                    f"train.recon_weight={w_rec} but model '{model_cfg.name}' returns no "
                    "reconstruction; set train.recon_weight=0 or use genconvit_ed/genconvit_vae"
                )
            if images is None:
                raise DistribError(
                    "the reconstruction loss needs the input images: call loss_fn(output, target, images)"
                )
            recon = F.mse_loss(output["recon"].float(), images.float())
            loss = loss + w_rec * recon
            parts["recon"] = float(recon.detach())
        if w_kl > 0:
            if not isinstance(output, dict) or output.get("logvar") is None:
                raise ConfigError(
                    f"train.kl_weight={w_kl} but model '{model_cfg.name}' is not a VAE "
                    "(no mu/logvar); set train.kl_weight=0 or use genconvit_vae"
                )
            kl = kl_divergence(output["mu"].float(), output["logvar"].float())
            loss = loss + w_kl * kl
            parts["kl"] = float(kl.detach())
        parts["total"] = float(loss.detach())
        return loss, parts

    return loss_fn


def _binary_logit(logits: torch.Tensor) -> torch.Tensor:
    """One logit per sample: [B, 1] as is, [B, 2] as logit(softmax[:, 1]) = z1 - z0."""
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]


def distill_loss(
    student_logits, teacher_logits, target: torch.Tensor, alpha: float, T: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """``alpha * KD(T) + (1 - alpha) * CE`` (Hinton et al.), for 1- or 2-logit heads.

    KD is KL(teacher || student) on temperature-softened distributions, scaled by T^2 so its gradient
    size does not shrink with T. Two 2-logit heads use the softmax KL; otherwise both heads are reduced to
    one binary logit and the Bernoulli KL is used, so a 2-logit teacher can teach a 1-logit student.
    """
    s, t = _logits(student_logits), _logits(teacher_logits).detach()
    if s.shape[0] != t.shape[0]:
        raise DistribError(f"student batch {s.shape[0]} != teacher batch {t.shape[0]}")
    if s.shape[1] == 2 and t.shape[1] == 2:
        log_ps = F.log_softmax(s.float() / T, dim=1)
        log_pt = F.log_softmax(t.float() / T, dim=1)
        kd = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    else:
        zs, zt = _binary_logit(s.float()) / T, _binary_logit(t.float()) / T
        # Bernoulli KL(pt || ps) in log-space for stability: logsigmoid(z) = log p, logsigmoid(-z) = log(1-p).
        pt = torch.sigmoid(zt)
        kd = (pt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - pt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))).mean()
    ce = classification_loss(s, target, label_smoothing)
    return alpha * (T * T) * kd + (1 - alpha) * ce
