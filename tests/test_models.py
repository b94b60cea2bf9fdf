"""build_model: every seed/registered model trains a step at a tiny size; names, weights files, probe."""

from __future__ import annotations

import pytest
import torch

from distrib.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from distrib.errors import DistribError
from distrib.models import build_model, list_models
from distrib.training.losses import build_loss
from distrib.training.optim import build_optimizer, trainable_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches gain nothing from 2 OpenMP threads, and on a loaded 2-core box they spin against other
    processes (5-20x slower measured here); restore the setting for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Small ConvNeXt + a 1-block-per-stage Swin: the GenConViT layout at 32 px in about a second.
TINY_GENCONVIT = dict(
    convnext="convnext_atto",
    swin="swin_tiny_patch4_window7_224",
    head_hidden=32,
    swin_kwargs=dict(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4),
)

# (name, input px, extra ModelConfig fields): the seed experiments' models at the smallest size that
# exercises every stage (ConvNeXt needs >= 32 px; DINOv2 needs img_size, a multiple of 14).
SEED_MODELS = [
    ("mobilenetv4_conv_small.e2400_r224_in1k", 32, {}),
    ("tf_efficientnetv2_b3.in21k_ft_in1k", 32, {}),
    ("resnet50.a1_in1k", 32, {}),
    ("convnextv2_tiny.fcmae_ft_in1k", 32, {}),
    ("efficientnet_b2.ra_in1k", 32, {}),
    ("vit_small_patch14_dinov2.lvd142m", 28, {"img_size": 28}),
    ("genconvit_ed", 32, {"img_size": 32, "kwargs": TINY_GENCONVIT}),
    ("genconvit_vae", 32, {"img_size": 32, "kwargs": TINY_GENCONVIT}),
]


def test_every_registered_model_is_in_the_seed_list():
    assert set(list_models()) <= {name for name, _, _ in SEED_MODELS}
    assert {"genconvit_ed", "genconvit_vae"} <= set(list_models())


@pytest.mark.parametrize("name,size,extra", SEED_MODELS, ids=[m[0].split(".")[0] for m in SEED_MODELS])
def test_forward_backward_and_embedding_width(name, size, extra):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, num_classes=2, **extra)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    assert logits.shape == (2, 2)
    train_cfg = (
        TrainConfig(cls_weight=0.9, recon_weight=0.1, kl_weight=0.01 if name == "genconvit_vae" else 0.0)
        if name.startswith("genconvit")
        else TrainConfig()
    )
    loss, parts = build_loss(train_cfg, cfg)(out, torch.tensor([0, 1]), x)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(loss) and parts["cls"] > 0
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features)
        again = model(x)
        again = again["logits"] if isinstance(again, dict) else again
        # the embedding is exactly what the head sees
        assert torch.allclose(model.forward_head(feats), again, atol=1e-5)


def test_timm_wrapper_matches_the_bare_timm_model():
    import timm

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", num_classes=1)).eval()
    bare = timm.create_model("resnet18", num_classes=1).eval()
    bare.load_state_dict(model.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), bare(x), atol=1e-6)
    assert all(k.startswith(("model.", "head_drop")) for k in model.state_dict())


@pytest.mark.parametrize("num_classes", [1, 2])
def test_both_head_types(num_classes):
    from distrib.training.losses import positive_prob

    model = build_model(ModelConfig(name="resnet18", num_classes=num_classes))
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, num_classes)
    prob = positive_prob(logits)
    assert prob.shape == (3,) and bool(((prob >= 0) & (prob <= 1)).all())
    loss, _ = build_loss(TrainConfig(label_smoothing=0.1), ModelConfig(name="resnet18", num_classes=num_classes))(
        logits, torch.tensor([0, 1, 1]), None
    )
    loss.backward()


def test_bad_model_name_lists_closest_names():
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(name="resnet5O"))
    assert "resnet50" in str(e.value) and "model.name" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(name="genconvit_edd"))
    assert "genconvit_ed" in str(e.value)
    with pytest.raises(ConfigError) as e:  # right architecture, wrong pretrained tag
        build_model(ModelConfig(name="resnet50.a1_in1kk"))
    assert "resnet50.a1_in1k" in str(e.value) and "tag" in str(e.value)


def test_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="model.img_size=0"):
        build_model(ModelConfig(name="resnet18", img_size=64))  # convnets take no img_size
    with pytest.raises(ConfigError, match="head_hidden"):
        build_model(ModelConfig(name="genconvit_ed", kwargs={"head_hiden": 8}))
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_model(ModelConfig(name="resnet18", kwargs={"num_classes": 3}))


def test_missing_pretrained_file_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(name="resnet18", pretrained_file=str(missing)))
    assert str(missing) in str(e.value) and "pretrained_file" in str(e.value)
    with pytest.raises(ConfigError, match="genconvit.pth"):
        build_model(ModelConfig(name="genconvit_ed", pretrained_file=str(tmp_path / "genconvit.pth")))


def test_existing_pretrained_file_is_really_loaded(tmp_path):
    import timm

    torch.manual_seed(123)
    source = timm.create_model("test_resnet")  # 1000-class ImageNet-shaped checkpoint, 1.5 MB
    path = tmp_path / "resnet_weights.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    loaded = build_model(ModelConfig(name="test_resnet", num_classes=2, pretrained_file=str(path)))
    torch.manual_seed(0)
    random = build_model(ModelConfig(name="test_resnet", num_classes=2))
    sd = loaded.model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("fc."):
            continue  # the 1000-class head is dropped for a 2-logit head
        assert torch.equal(sd[key], value), key
    assert not torch.equal(random.model.conv1[0].weight, source.conv1[0].weight)
    assert loaded.model.fc.weight.shape == (2, source.num_features)
    # a file for another architecture is a clear error naming the file
    short = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.")}
    torch.save(short, tmp_path / "short_resnet.pth")  # a file for a shallower network
    with pytest.raises(DistribError, match=r"short_resnet.pth.*tensors missing"):
        build_model(ModelConfig(name="test_resnet", pretrained_file=str(tmp_path / "short_resnet.pth")))
    # the same names in other shapes: one line with the count and the first tensor, not torch's 70 lines
    with pytest.raises(DistribError, match=r"resnet_weights.pth.*: \d+ tensors do not fit, the first: size mis") as e:
        build_model(ModelConfig(name="resnet10t", pretrained_file=str(path)))
    assert "\n" not in str(e.value)


def test_linear_probe_freezes_backbone_bit_identically():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", num_classes=1, freeze_backbone=True))
    head = model.get_classifier()
    params = trainable_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in head.parameters()}
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.5, weight_decay=0.0))  # the trainer's factory
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted([id(head.weight), id(head.bias)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.model.model.training and not model.model.model.bn1.training and head.training
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    loss, _ = build_loss(TrainConfig(), ModelConfig(name="resnet18", num_classes=1))(model(x), y, x)
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # weights AND BatchNorm running statistics of the backbone are untouched; the head moved
    assert changed == {"model.model.fc.weight", "model.model.fc.bias"}


def test_dinov2_probe_trains_only_a_384_wide_head(tmp_path):
    import timm

    # EXP-006 path: a headless 518-px DINOv2 checkpoint, position embeddings resampled by timm to 28 px.
    source = timm.create_model("vit_small_patch14_dinov2.lvd142m", num_classes=0)
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(source.state_dict(), path)
    model = build_model(
        ModelConfig(
            name="vit_small_patch14_dinov2.lvd142m",
            num_classes=2,
            img_size=28,
            freeze_backbone=True,
            pretrained_file=str(path),
        )
    )
    vit = model.model.model
    assert torch.equal(vit.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert vit.pos_embed.shape[1] == 1 + 2 * 2  # cls token + a 2x2 patch grid
    assert model.num_features == 384
    assert sum(p.numel() for p in trainable_parameters(model)) == 384 * 2 + 2


def test_genconvit_vae_reparameterizes_in_train_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="genconvit_vae", num_classes=1, img_size=32, kwargs=TINY_GENCONVIT))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with torch.no_grad():
        torch.manual_seed(7)
        recon, mu, logvar = model.reconstruct(x)
        eps_mu, eps_logvar = model.encoder(x)
        torch.manual_seed(7)
        eps = torch.randn_like(eps_mu)
        expected = model.decoder(eps_mu + eps * torch.exp(0.5 * eps_logvar))
    assert torch.allclose(recon, expected, atol=1e-5)
    assert not torch.allclose(recon, model.decoder(mu).detach(), atol=1e-4)  # noise really was added
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a["recon"], b["recon"]) and torch.equal(a["logits"], b["logits"])
        assert torch.allclose(a["recon"], model.decoder(a["mu"]), atol=1e-6)
        err = ((a["recon"] - x) ** 2).flatten(1).mean(1)
        assert torch.allclose(a["recon_error"], err, atol=1e-6)
    assert model(x)["mu"].shape == (2, 16, 2, 2)  # latent: 16 channels at 1/16 resolution


def test_genconvit_rejects_sizes_the_encoder_cannot_mirror():
    model = build_model(ModelConfig(name="genconvit_ed", num_classes=1, img_size=32, kwargs=TINY_GENCONVIT))
    with pytest.raises(ConfigError, match="model.img_size"):
        model(torch.randn(1, 3, 64, 64))  # built for 32 px
    kwargs = dict(TINY_GENCONVIT, swin_kwargs=dict(TINY_GENCONVIT["swin_kwargs"], dynamic_img_size=True))
    model = build_model(ModelConfig(name="genconvit_ed", num_classes=1, img_size=32, kwargs=kwargs))
    assert model(torch.randn(1, 3, 64, 64))["recon"].shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="multiple of 32"):
        model(torch.randn(1, 3, 48, 48))


def test_genconvit_full_size_parameter_count_is_sane():
    # The public code's flatten->Linear latent reaches ~600M parameters; ours stays near two backbones.
    model = build_model(ModelConfig(name="genconvit_ed", num_classes=2, img_size=224))
    n = sum(p.numel() for p in model.parameters())
    backbones = sum(p.numel() for p in model.convnext.parameters()) + sum(p.numel() for p in model.swin.parameters())
    assert n < 70e6 and n - backbones < 2e6


def test_bench_latency_prints_json_with_ratio_to_resnet50(capsys):
    import json

    from distrib.cli import main

    rc = main(["bench", "latency", "repeats=2", "threads=1", "models=mobilenetv4_conv_small.e2400_r224_in1k"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["models"]
    assert set(rows) == {"resnet50.a1_in1k", "mobilenetv4_conv_small.e2400_r224_in1k"}  # baseline always runs
    assert result["ratio_to_resnet50"]["resnet50.a1_in1k"] == 1.0
    for row in rows.values():  # structure only: timings never fail a unit test
        assert row["ms_per_img"] > 0
        # fp32 weights + buffers: the serialized size is at least 4 bytes per parameter
        assert row["mb"] >= row["params_m"] * 1e6 * 4 / 2**20 * 0.99
    assert rows["resnet50.a1_in1k"]["img_size"] == 128 and result["threads"] == 1
    assert main(["bench", "latency", "models=resnet51"]) == 2  # a bad option is a clear CLI error
