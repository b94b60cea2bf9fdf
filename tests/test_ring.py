"""The shared-ring loader path (data.ring): the same batches as the plain per-sample path, pixel for pixel, on
real shards written by ``distrib shard``, with 2 DataLoader workers; exactly-once eval; the same skip counts."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from distrib.config import AugmentConfig, DataConfig
from distrib.data.index import plan_split
from distrib.data.loader import build_loader
from distrib.data.transforms import build_transform

AUG = AugmentConfig(hflip=0.5, vflip=0.5, rotate=90, motion_blur_p=0.5, color_jitter=[0.2, 0.2, 0.2, 0.02])


def _epoch(shards, split, mode, ring, size=32, rank=0, world=1, workers=2, batch=8, epoch=1):
    tf = build_transform(AUG if mode == "train" else None, DataConfig(img_size=size), train=mode == "train")
    loader = build_loader(
        shards,
        split,
        None,
        rank,
        world,
        workers,
        batch,
        epoch,
        tf,
        seed=5,
        mode=mode,
        shuffle_buffer=32,
        augment_on="model",
        ring=ring,
    )
    assert (loader.stream.ring is not None) == ring
    return loader, list(loader)  # list(): every batch kept past its slot's reuse must stay intact


def _same(plain, ring, loader):
    assert len(plain) == len(ring) == len(loader)
    for a, b in zip(plain, ring):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == a["image"].shape
        assert torch.equal(a["image"], b["image"])  # pixel-identical
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["valid"], b["valid"])
        assert (a["key"], a["group"], a.get("index")) == (b["key"], b["group"], b.get("index"))
        out = loader.to_device(b, torch.device("cpu"))
        assert out.data_ptr() != b["image"].data_ptr()  # never ring memory
        assert torch.equal(out, loader.to_device(a, torch.device("cpu")))  # same augmentation too


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [32, 64])  # 32: resized into the slot; 64: the demo tiles decode straight into it
def test_ring_batches_equal_the_plain_path(demo_shards, size):
    for split, mode in (("train", "train"), ("val", "eval")):
        _, plain = _epoch(demo_shards, split, mode, ring=False, size=size)
        loader, ring = _epoch(demo_shards, split, mode, ring=True, size=size)
        _same(plain, ring, loader)
        if mode == "train":  # the workers' ring slots were reused several times during the epoch
            assert len(ring) > 2 * (loader.stream.ring.slots)


@pytest.mark.timeout(120)
def test_ring_eval_reads_every_sample_exactly_once_across_ranks(demo_shards):
    plan = plan_split(demo_shards, "val", None)
    seen, lengths = Counter(), set()
    for rank in range(2):
        loader, batches = _epoch(demo_shards, "val", "eval", ring=True, rank=rank, world=2, batch=7)
        lengths.add(len(batches))
        for b in batches:
            seen.update(k for k, v in zip(b["key"], b["valid"].tolist()) if v)
        assert loader.report()["samples"] == sum(int(b["valid"].sum()) for b in batches)
    assert len(lengths) == 1  # equal batch counts on both ranks
    assert sum(seen.values()) == plan.total and set(seen.values()) == {1}


@pytest.mark.timeout(120)
def test_ring_counts_corrupt_and_truncated_samples_like_the_plain_path(demo_shards, tmp_path):
    work = tmp_path / "s"
    shutil.copytree(demo_shards, work)
    index = json.loads((work / "index.json").read_text())
    train = [s for s in index["shards"] if s["split"] == "train"]
    bad = work / train[0]["path"]  # garble two images in place (same length: the offsets stay valid)
    with open(bad, "r+b") as f:
        for i in (2, 5):
            off, length = train[0]["offsets"][i][:2]
            f.seek(off)
            f.write(b"\x00" * length)
    cut = work / train[1]["path"]  # and cut another shard inside its sample 4
    cut.write_bytes(cut.read_bytes()[: train[1]["offsets"][4][0]])
    for split, mode in (("train", "train"), ("train", "eval")):
        plain_loader, plain = _epoch(work, split, mode, ring=False)
        loader, ring = _epoch(work, split, mode, ring=True)
        _same(plain, ring, loader)
        rp, rr = plain_loader.report(), loader.report()
        assert (rr["skipped_tar"], rr["skipped_decode"]) == (rp["skipped_tar"], rp["skipped_decode"])
        if mode == "eval":  # eval reads every sample once: all three faults are met and counted
            assert rr["skipped_decode"] == 2 and rr["skipped_tar"] == train[1]["count"] - 4


@pytest.mark.timeout(120)
def test_a_new_pass_closes_the_unfinished_one_and_kept_batches_stay_intact(demo_shards):
    ref = _epoch(demo_shards, "val", "eval", ring=False, batch=4)[1]
    loader = _epoch(demo_shards, "val", "eval", ring=True, batch=4)[0]
    first = next(iter(loader))
    it = iter(loader)
    kept = [next(it) for _ in range(len(ref) - 1)]  # more batches than slots: every slot reused, batches kept
    again = list(loader)  # closes the pass above (its workers share the ring) and starts over
    assert torch.equal(first["image"], ref[0]["image"])
    for got in (kept, again):
        assert all(torch.equal(g["image"], r["image"]) and g["key"] == r["key"] for g, r in zip(got, ref))
    assert len(again) == len(ref)


@pytest.mark.timeout(120)
def test_ring_rejects_a_stale_index(demo_shards, tmp_path):
    from distrib.errors import DataError

    work = tmp_path / "s"
    shutil.copytree(demo_shards, work)
    index = json.loads((work / "index.json").read_text())
    entry = next(s for s in index["shards"] if s["split"] == "val")
    entry["offsets"][0][0] += 1024  # now points at the .cls member of sample 0
    (work / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="index is stale"):
        _epoch(work, "val", "eval", ring=True)
