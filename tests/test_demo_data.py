"""The bundled demo dataset: manifests, group separation, shared processing history, leak check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distrib.demo.checks import LEAK_AUC_LIMIT, histogram_leak_check, residual_features
from distrib.demo.data import build_demo_dataset
from distrib.errors import DataError


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_manifests_are_grouped_and_balanced(demo_data):
    per_split = {s: _rows(demo_data / f"{s}_manifest.csv") for s in ("train", "val", "test")}
    summary = json.loads((demo_data / "summary.json").read_text())
    groups = {s: {r["group"] for r in rows} for s, rows in per_split.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert len(groups["train"]) >= 6, "the fixture shards train into 3 folds; it needs enough groups"
    for split, rows in per_split.items():
        assert list(rows[0]) == ["path", "label", "group"]
        labels = [int(r["label"]) for r in rows]
        assert labels.count(0) == labels.count(1) > 0  # every real tile has a manipulated twin
        assert summary["splits"][split]["n"] == len(rows)
        assert summary["splits"][split]["groups"] == sorted(groups[split])
    total = sum(len(r) for r in per_split.values())
    assert 200 <= total <= 600, "tiny means a few hundred tiles"
    paths = [r["path"] for rows in per_split.values() for r in rows]
    assert len(set(paths)) == total
    for rel in paths[::25]:
        data = (demo_data / rel).read_bytes()
        assert data[:3] == b"\xff\xd8\xff"
        with Image.open(demo_data / rel) as im:
            assert im.size == (64, 64) and im.mode == "RGB"


def test_both_classes_share_processing_history(demo_data):
    rows = _rows(demo_data / "manipulations.csv")
    q = {lab: np.array([int(r["quality"]) for r in rows if r["label"] == lab]) for lab in ("0", "1")}
    for lab in ("0", "1"):
        assert q[lab].min() >= 75 and q[lab].max() <= 95
    assert abs(q["0"].mean() - q["1"].mean()) < 2.0, "final JPEG quality must not reveal the label"
    real = {(r["source"], r["y"], r["x"]) for r in rows if r["label"] == "0"}
    fake = {(r["source"], r["y"], r["x"]) for r in rows if r["label"] == "1"}
    assert real == fake, "each real tile has one manipulated twin cut from the same pixels"
    kinds = {r["kind"] for r in rows if r["label"] == "1"}
    assert kinds == {"resample", "splice", "double_jpeg", "upsample"}
    # File names carry no label: numbering is shuffled within each group.
    first = sorted(rows, key=lambda r: r["path"])[:20]
    assert len({r["label"] for r in first}) == 2


def test_colour_histogram_leak_check_stays_near_chance(demo_data):
    result = histogram_leak_check(demo_data, folds=5, seed=0)
    assert result["folds"] == 5 and result["groups"] >= 10
    assert result["auc"] < LEAK_AUC_LIMIT, result
    assert result["passed"]


def test_residual_features_see_the_checkerboard():
    rng = np.random.default_rng(0)
    img = rng.normal(128, 20, size=(64, 64, 3)).astype(np.float32)
    checker = np.where((np.add.outer(np.arange(64), np.arange(64)) % 2) == 0, 6.0, -6.0)[..., None]
    plain, boarded = residual_features(img), residual_features(img + checker)
    assert plain.shape == boarded.shape and np.isfinite(plain).all()
    assert not np.allclose(plain, boarded)


def test_rerun_is_noop_and_other_params_need_overwrite(demo_data):
    manifest = demo_data / "train_manifest.csv"
    before = manifest.stat().st_mtime_ns
    again = build_demo_dataset(demo_data, size="tiny", seed=0)
    assert manifest.stat().st_mtime_ns == before
    assert again["params"] == {"size": "tiny", "tile": 64, "seed": 0, "images": None}
    with pytest.raises(DataError, match="overwrite"):
        build_demo_dataset(demo_data, size="tiny", seed=1)
    with pytest.raises(DataError, match="size='huge'"):
        build_demo_dataset(demo_data, size="huge")


def _photo_folder(tmp_path: Path, n: int) -> Path:
    import skimage.data

    src = [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        skimage.data.camera(),
        skimage.data.coins(),
        skimage.data.clock(),
    ]
    folder = tmp_path / "my_photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        ext = ".png" if i % 2 else ".jpg"
        target = folder / ("sub" if i == 0 else "") / f"photo{i}{ext}"
        Image.fromarray(src[i % len(src)]).save(target)
    return folder


@pytest.mark.timeout(120)
def test_own_images_folder_is_deterministic(tmp_path):
    photos = _photo_folder(tmp_path, 6)
    a = build_demo_dataset(tmp_path / "a", images=photos, size="tiny", seed=3)
    build_demo_dataset(tmp_path / "b", images=photos, size="tiny", seed=3)
    assert a["groups"] == 6
    assert {g for s in a["splits"].values() for g in s["groups"]} == {
        "sub_photo0",
        "photo1",
        "photo2",
        "photo3",
        "photo4",
        "photo5",
    }
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}_manifest.csv").read_bytes() == (
            tmp_path / "b" / f"{split}_manifest.csv"
        ).read_bytes()
    rel = _rows(tmp_path / "a" / "train_manifest.csv")[0]["path"]
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_too_few_own_images_is_a_clear_error(tmp_path):
    photos = _photo_folder(tmp_path, 3)
    with pytest.raises(DataError, match=r"found 3 photos.*at least 6"):
        build_demo_dataset(tmp_path / "out", images=photos, size="tiny")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="not a directory"):
        build_demo_dataset(tmp_path / "out", images=tmp_path / "nope", size="tiny")
