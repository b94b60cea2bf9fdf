"""Losses checked against hand-computed values (explicit formulas, never the function under test)."""

from __future__ import annotations

import math

import pytest
import torch

from distrib.config import ConfigError, ModelConfig, TrainConfig
from distrib.training.losses import build_loss, distill_loss, kl_divergence, positive_prob


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_bce_one_logit_with_label_smoothing_matches_hand_value():
    logits = torch.tensor([[0.0], [math.log(3.0)]])  # sigmoid -> 0.5, 0.75
    target = torch.tensor([1, 0])
    ls = 0.1
    fn = build_loss(TrainConfig(label_smoothing=ls), ModelConfig(name="resnet18", num_classes=1))
    loss, parts = fn(logits, target, None)
    y = [1 * (1 - ls) + ls / 2, 0 * (1 - ls) + ls / 2]  # 0.95, 0.05
    p = [0.5, 0.75]
    expected = -sum(yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for yi, pi in zip(y, p)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["cls"] == pytest.approx(expected, rel=1e-6)


def test_ce_two_logits_with_label_smoothing_matches_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])
    target = torch.tensor([1, 1])
    ls = 0.2
    fn = build_loss(TrainConfig(label_smoothing=ls), ModelConfig(name="resnet18", num_classes=2))
    loss, _ = fn(logits, target, None)
    expected = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        logp = [v - lse for v in row]
        # PyTorch smoothing: (1 - ls) * one-hot + ls / C over the C classes.
        expected += -((1 - ls) * logp[t] + ls * sum(logp) / 2)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)


def _genconvit_output(with_vae: bool):
    images = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])  # [2, 1, 2, 2]
    recon = torch.tensor([[[[0.0, 0.0], [2.0, 1.0]]], [[[0.5, 1.5], [0.5, 0.5]]]])
    out = dict(logits=torch.tensor([[0.0], [math.log(3.0)]]), recon=recon, mu=None, logvar=None)
    if with_vae:
        out["mu"] = torch.tensor([[1.0, 0.0], [0.5, -0.5]])
        out["logvar"] = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    return out, torch.tensor([1, 1]), images


def test_genconvit_ed_loss_matches_hand_value():
    out, target, images = _genconvit_output(with_vae=False)
    cfg = TrainConfig(cls_weight=0.9, recon_weight=0.1, kl_weight=0.0)
    loss, parts = build_loss(cfg, ModelConfig(name="genconvit_ed", num_classes=1))(out, target, images)
    bce = -(math.log(0.5) + math.log(0.75)) / 2
    # squared errors: sample 0 -> 0, 1, 0, 4; sample 1 -> 0, 1, 0, 0; mean over all 8 elements
    mse = (0 + 1 + 0 + 4 + 0 + 1 + 0 + 0) / 8
    assert parts["cls"] == pytest.approx(bce, rel=1e-6)
    assert parts["recon"] == pytest.approx(mse, rel=1e-6)
    assert "kl" not in parts
    assert loss.item() == pytest.approx(0.9 * bce + 0.1 * mse, rel=1e-6)


def test_genconvit_vae_loss_matches_hand_value():
    out, target, images = _genconvit_output(with_vae=True)
    cfg = TrainConfig(cls_weight=0.9, recon_weight=0.1, kl_weight=0.01)
    loss, parts = build_loss(cfg, ModelConfig(name="genconvit_vae", num_classes=1))(out, target, images)
    bce = -(math.log(0.5) + math.log(0.75)) / 2
    mse = 6 / 8
    # KL per sample = -0.5 * sum(1 + logvar - mu^2 - exp(logvar))
    kl0 = -0.5 * ((1 + 0 - 1 - 1) + (1 + math.log(2) - 0 - 2))
    kl1 = -0.5 * ((1 + 0 - 0.25 - 1) + (1 + 0 - 0.25 - 1))
    kl = (kl0 + kl1) / 2
    assert parts["kl"] == pytest.approx(kl, rel=1e-6)
    assert kl_divergence(out["mu"], out["logvar"]).item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.9 * bce + 0.1 * mse + 0.01 * kl, rel=1e-6)
    assert parts["total"] == pytest.approx(loss.item(), rel=1e-6)


def test_recon_or_kl_weight_without_matching_model_output_is_a_config_error():
    logits = torch.zeros(2, 1)
    fn = build_loss(TrainConfig(recon_weight=0.1), ModelConfig(name="resnet18", num_classes=1))
    with pytest.raises(ConfigError, match="train.recon_weight"):
        fn(logits, torch.tensor([0, 1]), torch.zeros(2, 3, 4, 4))
    out, target, images = _genconvit_output(with_vae=False)
    fn = build_loss(TrainConfig(kl_weight=0.01), ModelConfig(name="genconvit_ed", num_classes=1))
    with pytest.raises(ConfigError, match="train.kl_weight"):
        fn(out, target, images)


def test_positive_prob_both_head_types_agree():
    z = torch.tensor([-2.0, 0.0, 1.5])
    one = positive_prob(z[:, None])
    two = positive_prob(torch.stack([torch.zeros(3), z], dim=1))  # softmax([0, z])[1] == sigmoid(z)
    expected = torch.tensor([_sig(v) for v in z.tolist()])
    assert torch.allclose(one, expected, atol=1e-6) and torch.allclose(two, expected, atol=1e-6)
    assert one.shape == (3,) and torch.allclose(positive_prob({"logits": z[:, None]}), expected, atol=1e-6)
    with pytest.raises(Exception, match="num_classes"):
        positive_prob(torch.zeros(3, 4))


def test_distill_two_logits_matches_hand_value():
    s = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    t = torch.tensor([[0.0, 3.0], [0.5, 0.5]])
    target = torch.tensor([1, 0])
    alpha, T = 0.7, 2.0
    kd = 0.0
    ce = 0.0
    for srow, trow, y in zip(s.tolist(), t.tolist(), target.tolist()):
        ps = [math.exp(v / T) for v in srow]
        ps = [v / sum(ps) for v in ps]
        pt = [math.exp(v / T) for v in trow]
        pt = [v / sum(pt) for v in pt]
        kd += sum(a * math.log(a / b) for a, b in zip(pt, ps))
        e = [math.exp(v) for v in srow]
        ce += -math.log(e[y] / sum(e))
    expected = alpha * T * T * kd / 2 + (1 - alpha) * ce / 2
    assert distill_loss(s, t, target, alpha, T).item() == pytest.approx(expected, rel=1e-5)


def test_distill_one_logit_and_mixed_heads():
    zs = torch.tensor([[0.5], [-1.0]])
    zt = torch.tensor([[2.0], [0.0]])
    target = torch.tensor([1, 0])
    alpha, T = 0.5, 3.0
    kd = 0.0
    for a, b in zip(zs[:, 0].tolist(), zt[:, 0].tolist()):
        ps, pt = _sig(a / T), _sig(b / T)
        kd += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    bce = -(math.log(_sig(0.5)) + math.log(1 - _sig(-1.0))) / 2
    expected = alpha * T * T * kd / 2 + (1 - alpha) * bce
    assert distill_loss(zs, zt, target, alpha, T).item() == pytest.approx(expected, rel=1e-5)
    # a 2-logit teacher [0, z] carries the same binary distribution as a 1-logit teacher z
    zt2 = torch.cat([torch.zeros(2, 1), zt], dim=1)
    assert distill_loss(zs, zt2, target, alpha, T).item() == pytest.approx(expected, rel=1e-5)
    # alpha = 0 is plain BCE; identical student and teacher leave only the CE term
    assert distill_loss(zs, zt, target, 0.0, T).item() == pytest.approx(bce, rel=1e-6)
    assert distill_loss(zs, zs, target, 0.5, T).item() == pytest.approx(0.5 * bce, rel=1e-6)
