"""model.pretrained: true loads timm's own weights from a real Hugging Face hub cache, offline; with an
empty cache the error names the model, the cache path and both ways out. Nothing is mocked: the cache
is the layout huggingface_hub itself reads (HF_HOME/hub/models--timm--NAME/snapshots/REV + refs/main),
and the models are built in child processes so HF_HOME/HF_HUB_OFFLINE take effect at import."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, subprocess_env

REV = "0123456789abcdef0123456789abcdef01234567"
SWIN = {"embed_dim": 48, "depths": [1, 1, 1, 1], "num_heads": [2, 2, 2, 2], "window_size": 4}

# Child script: build ModelConfig(**argv[1]) and report, for every tensor of each saved hub file, whether
# the built model holds exactly the file's values.
CHECK = r"""
import json, sys
import safetensors.torch, torch
from distrib.config import build_config
from distrib.models import build_model
cfg, files = json.loads(sys.argv[1]), json.loads(sys.argv[2])
model = build_model(build_config({"model": cfg}).model)
state = model.state_dict()
out = {}
for prefix, path in files.items():
    saved = safetensors.torch.load_file(path)
    shared = [k for k in saved if prefix + k in state and state[prefix + k].shape == saved[k].shape]
    out[prefix] = {"saved": len(saved), "shared": len(shared),
                   "equal": sum(torch.equal(state[prefix + k], saved[k]) for k in shared)}
print(json.dumps(out))
"""


def _hub_file(hf_home: Path, name: str, **kwargs) -> Path:
    """Save a random-init timm ``name`` as model.safetensors where the hub cache keeps its default tag."""
    import safetensors.torch
    import timm
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(name).hf_hub_id  # e.g. timm/test_resnet.r160_in1k
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def _build(tmp: Path, hf_home: Path, cfg: dict, files: dict) -> subprocess.CompletedProcess:
    env = subprocess_env(tmp)
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [PYTHON, "-c", CHECK, json.dumps(cfg), json.dumps({k: str(v) for k, v in files.items()})],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pretrained_true_loads_the_hub_cache_offline(tmp_path):
    hf_home = tmp_path / "hf"
    path = _hub_file(hf_home, "test_resnet")
    proc = _build(tmp_path, hf_home, {"name": "test_resnet", "num_classes": 1, "pretrained": True}, {"model.": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])["model."]
    # every tensor but the 1000-class head (replaced by our 1-logit head) is the file's, bit for bit
    assert res["shared"] == res["equal"] and res["saved"] - res["shared"] <= 2 and res["equal"] > 10


def test_genconvit_backbones_take_pretrained_from_the_hub_cache(tmp_path):
    hf_home = tmp_path / "hf"
    files = {
        "convnext.": _hub_file(hf_home, "convnext_atto"),
        "swin.": _hub_file(hf_home, "swin_tiny_patch4_window7_224", img_size=64, **SWIN),
    }
    cfg = {
        "name": "genconvit_ed",
        "num_classes": 1,
        "img_size": 64,
        "pretrained": True,
        "kwargs": {"convnext": "convnext_atto", "swin": "swin_tiny_patch4_window7_224", "swin_kwargs": SWIN},
    }
    proc = _build(tmp_path, hf_home, cfg, files)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for prefix, res in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert res["shared"] == res["equal"] and res["equal"] > 10, (prefix, res)
        assert res["saved"] - res["shared"] <= 4, (prefix, res)  # only the classifier head (and swin buffers)


def test_pretrained_true_with_an_empty_cache_names_model_cache_and_the_ways_out(tmp_path):
    hf_home = tmp_path / "empty_hf"
    hf_home.mkdir()
    proc = _build(tmp_path, hf_home, {"name": "test_resnet", "num_classes": 1, "pretrained": True}, {})
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert "DistribError" in err and "'test_resnet'" in err
    assert str(hf_home / "hub" / "models--timm--test_resnet.r160_in1k") in err
    assert "model.pretrained_file" in err and "model.pretrained=false" in err and "HF_HUB_OFFLINE=1" in err
    assert "python -c \"import timm; timm.create_model('test_resnet', pretrained=True)\"" in err


@pytest.mark.parametrize(
    "name",
    [
        "deepfake_stage1_mobilenetv4",
        "deepfake_expert_effnetv2_b3",
        "deepfake_expert_genconvit_ed",
        "pit_baseline_resnet50",
    ],
)
def test_full_size_experiments_use_pretrained_weights_and_demo_does_not(name):
    from distrib.config import load_config

    experiments = REPO / "launch" / "configs" / "experiments"
    assert load_config(experiments / f"{name}.yaml").model.pretrained
    for demo in experiments.glob("demo_*.yaml"):
        assert not load_config(demo).model.pretrained
