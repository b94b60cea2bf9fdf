"""augment.device=model on CPU: the same images as augmenting in the loader, seeded per (seed, epoch, rank, batch);
offset-indexed shard reads equal tar-stream reads; batched decode (the decode_device=cuda code path) on CPU."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env
from distrib.config import AugmentConfig, ConfigError, DataConfig
from distrib.data.index import plan_split, read_samples
from distrib.data.loader import _Stats, build_loader
from distrib.data.transforms import augment_placement, build_transform, decode_batch, decode_image
from distrib.errors import DataError
from loader_shards import write_tiny_shards

AUG = AugmentConfig(
    hflip=0.5,
    vflip=0.5,
    rotate=180,
    translate=0.1,
    scale_min=0.9,
    scale_max=1.1,
    motion_blur_p=0.5,
    color_jitter=[0.3, 0.3, 0.2, 0.05],
    random_resized_crop=True,
)
LAYOUT = [("train", 0, 23), ("train", 0, 9), ("train", 1, 14), ("val", -1, 11)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("augdev")
    write_tiny_shards(out, LAYOUT, size=40)
    return out


def _loader(shards, place, workers=0, epoch=0, rank=0, mode="train", train=True):
    tf = build_transform(AUG if train else None, DataConfig(img_size=32), train=train)
    split, folds = ("train", [0, 1]) if mode == "train" else ("val", None)
    return build_loader(
        shards, split, folds, rank, 2, workers, 4, epoch, tf, seed=7, mode=mode, shuffle_buffer=16, augment_on=place
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_model_placement_gives_the_loader_placement_images(shards, workers):
    on_loader = list(_loader(shards, "loader", workers))
    model = _loader(shards, "model", workers)
    raw = list(model)
    assert len(raw) == len(on_loader) == len(model) == 6  # ceil(46 / (2 ranks * 4))
    for a, b in zip(on_loader, raw):
        assert b["image"].dtype == torch.uint8 and a["image"].dtype == torch.float32
        assert a["key"] == b["key"] and a["index"] == b["index"]
        moved = model.to_device(b, torch.device("cpu"))
        assert moved.dtype == torch.float32 and torch.allclose(moved, a["image"], atol=1e-3)
    assert [b["index"] for b in raw] == list(range(len(raw)))  # the round-robin batch index of the epoch


@pytest.mark.timeout(300)
def test_model_placement_is_seeded_per_seed_epoch_rank_and_batch(shards):
    loader = _loader(shards, "model")
    batch = next(iter(loader))
    cpu = torch.device("cpu")
    again = loader.to_device(batch, cpu)
    assert torch.equal(loader.to_device(batch, cpu), again)  # a re-run (or a resumed step) sees the same images
    other = {**batch, "index": batch["index"] + 1}
    assert not torch.equal(loader.to_device(other, cpu), again)  # another step, another draw
    for kw in ({"epoch": 1}, {"rank": 1}):
        o = _loader(shards, "model", **kw)
        assert not torch.equal(o.to_device(batch, cpu), again)
    # channels_last comes out in the requested memory format
    assert loader.to_device(batch, cpu, channels_last=True).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.timeout(300)
def test_eval_normalizes_after_the_transfer_too(shards):
    ref = [b["image"] for b in _loader(shards, "loader", mode="eval", train=False)]
    model = _loader(shards, "model", mode="eval", train=False)
    got = list(model)
    assert [b["image"].dtype for b in got] == [torch.uint8] * len(ref)
    assert sum(int(b["valid"].sum()) for b in got) == 5  # rank 0 of 2 reads 5 of the 11 (1 shard split in 4 ranges)
    for r, b in zip(ref, got):  # padding rows (valid=False) are dropped by evaluate: compare the real ones
        v = b["valid"]
        assert torch.allclose(model.to_device(b, torch.device("cpu"))[v], r[v], atol=1e-5)


def test_auto_placement_and_decode_device_rules():
    aug, data = AugmentConfig(), DataConfig()
    assert augment_placement(aug, data, "cpu") == ("loader", "cpu")
    assert augment_placement(aug, data, torch.device("cuda")) == ("model", "cpu")
    assert augment_placement(AugmentConfig(device="model"), data, "cpu") == ("model", "cpu")
    assert augment_placement(AugmentConfig(device="loader"), data, "cuda") == ("loader", "cpu")
    assert augment_placement(aug, DataConfig(decode_device="cuda"), "cuda") == ("model", "cuda")
    with pytest.raises(ConfigError, match="data.decode_device=cuda.*data.decode_device=cpu"):
        augment_placement(aug, DataConfig(decode_device="cuda"), "cpu")
    with pytest.raises(ConfigError, match="augment.device=loader"):
        augment_placement(AugmentConfig(device="loader"), DataConfig(decode_device="cuda"), "cuda")
    with pytest.raises(ConfigError, match="augment.device"):
        AugmentConfig(device="gpu")
    with pytest.raises(ConfigError, match="data.decode_device"):
        DataConfig(decode_device="nvjpeg")


def test_batched_decode_matches_the_worker_decode():
    """decode_batch (torchvision decode_jpeg + antialiased resize) on CPU: the decode_device=cuda code path."""
    import simplejpeg

    rng = np.random.default_rng(0)
    base = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
    imgs = [np.kron(base, np.ones((k, k, 1), np.uint8))[:h, :w] for k, h, w in ((6, 72, 60), (4, 48, 48), (8, 32, 40))]
    blobs = [simplejpeg.encode_jpeg(np.ascontiguousarray(i), quality=95) for i in imgs]
    out = decode_batch([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], 32, "cpu")
    tf = build_transform(None, DataConfig(img_size=32), train=False)
    ref = torch.stack([tf.prepare(decode_image(b, 32)) for b in blobs])
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    assert (out.float() - ref.float()).abs().mean() < 6  # PIL vs torch bilinear and DCT-scaled decode differ a little
    with pytest.raises(DataError, match="decode_device=cpu"):
        decode_batch([torch.frombuffer(bytearray(b"\xff\xd8\xffgarbage"), dtype=torch.uint8)], 32, "cpu")


def test_offset_reads_equal_tar_stream_reads(demo_shards):
    plan = plan_split(demo_shards, "train", None)
    assert set(plan.offsets) == set(plan.urls)  # distrib shard records offsets for every shard
    src = [{"url": u} for u in plan.urls]
    fast = list(read_samples(src, plan.counts, _Stats(), plan.offsets))
    slow = list(read_samples(src, plan.counts, _Stats()))
    assert len(fast) == len(slow) == plan.total
    for f, s in zip(fast, slow):
        assert (f["__key__"], f["jpg"], f["json"]) == (s["__key__"], s["jpg"], s["json"])
        assert json.loads(f["json"])["label"] == int(s["cls"])
    u = plan.urls[0]  # a range inside a shard, by both readers
    part = [{"url": u, "start": 3, "stop": 7}]
    assert (
        [s["__key__"] for s in read_samples(part, plan.counts, _Stats(), plan.offsets)]
        == [s["__key__"] for s in read_samples(part, plan.counts, _Stats())]
        == [s["__key__"] for s in fast[3:7]]
    )


def test_offset_reader_counts_truncation_and_rejects_a_stale_index(demo_shards, tmp_path):
    import shutil

    work = tmp_path / "s"
    shutil.copytree(demo_shards, work)
    plan = plan_split(work, "train", None)
    u = plan.urls[0]
    data = open(u, "rb").read()
    cut = plan.offsets[u][5][0]  # inside sample 5's image
    open(u, "wb").write(data[:cut])
    stats = _Stats()
    got = list(read_samples([{"url": u}], plan.counts, stats, plan.offsets))
    assert len(got) == 5 and stats.tar == plan.counts[u] - 5 and "truncated" in stats.errors[0]
    index = json.loads((work / "index.json").read_text())
    entry = next(s for s in index["shards"] if s["path"] == plan.urls[1].rsplit("/", 1)[1])
    entry["offsets"][0][0] += 1024  # now points at the .cls member of sample 0
    (work / "index.json").write_text(json.dumps(index))
    plan = plan_split(work, "train", None)
    with pytest.raises(DataError, match="index is stale"):
        list(read_samples([{"url": plan.urls[1]}], plan.counts, _Stats(), plan.offsets))


@pytest.mark.timeout(300)
def test_eval_ranges_inside_offset_shards_exactly_once(demo_shards):
    plan = plan_split(demo_shards, "val", None)
    assert len(plan.urls) < 2 * 2 and set(plan.offsets) == set(plan.urls)
    tf = build_transform(None, DataConfig(img_size=32), train=False)
    seen = Counter()
    for rank in range(2):
        for b in build_loader(demo_shards, "val", None, rank, 2, 2, 8, 0, tf, 0, mode="eval", augment_on="model"):
            seen.update(k for k, v in zip(b["key"], b["valid"].tolist()) if v)
    assert sum(seen.values()) == plan.total and set(seen.values()) == {1}


def _train(out, shards, tmp, device):
    cmd = [
        PYTHON,
        "launch/train.py",
        "launch/configs/experiments/debug.yaml",
        "train.epochs=1",
        "train.latency_batches=1",
        f"data.shards={shards}",
        "--out",
        str(out),
        f"augment.device={device}",
        "augment.rotate=30",
        "augment.motion_blur_p=0.5",
        "augment.color_jitter=[0.2,0.2,0.2,0.02]",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_training_with_model_placement_equals_loader_placement(demo_shards, tmp_path):
    """Same seed, augmentation in the step instead of the workers: the same weights on CPU."""
    on_loader = _train(tmp_path / "loader", demo_shards, tmp_path, "loader")
    on_model = _train(tmp_path / "model", demo_shards, tmp_path, "model")
    assert on_model["param_checksum"] == on_loader["param_checksum"]
    assert on_model["val_loss"] == pytest.approx(on_loader["val_loss"], abs=1e-6)


def test_flat_multi_size_rows_still_stack(shards):
    """A transform whose prepare returns flat rows (the cascade's multi-size one) is stacked, not taken for JPEG bytes."""
    from distrib.cascade.run import MultiSizeTransform

    multi = MultiSizeTransform([16, 32])
    b = next(iter(build_loader(shards, "val", None, 0, 1, 0, 4, 0, multi, 0, mode="eval")))
    assert torch.is_tensor(b["image"]) and b["image"].shape == (4, 3 * (16 * 16 + 32 * 32))
    assert multi.view(b["image"], 32).shape == (4, 3, 32, 32)
