"""Loader tests on real tar shards: equal batch counts, exactly-once eval, corrupt samples, determinism, HTTP."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter

import pytest
import torch

from distrib.config import AugmentConfig, DataConfig
from distrib.data.index import plan_split, read_index
from distrib.data.loader import build_loader, folds_for
from distrib.data.transforms import build_transform
from distrib.errors import DataError
from loader_shards import write_tiny_shards

UNEVEN = [
    ("train", 0, 40),
    ("train", 0, 3),
    ("train", 1, 17),
    ("train", 1, 5),
    ("train", 2, 9),
    ("val", -1, 13),
    ("val", -1, 5),
    ("val", -1, 9),
    ("val", -1, 2),
]
AUG = AugmentConfig(
    hflip=0.5,
    vflip=0.5,
    rotate=180,
    translate=0.1,
    scale_min=0.9,
    scale_max=1.1,
    motion_blur_p=0.5,
    color_jitter=[0.3, 0.3, 0.2, 0.05],
)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    out = tmp_path_factory.mktemp("uneven")
    index = write_tiny_shards(out, UNEVEN, size=32)
    return out, index


def _train_tf():
    return build_transform(AUG, DataConfig(img_size=32), train=True)


def _eval_tf():
    return build_transform(None, DataConfig(img_size=32), train=False)


def _keys(index, split, folds=None):
    return {
        f"{f'f{f}' if s == 'train' else s}s{i}i{j}"
        for i, (s, f, n) in enumerate(UNEVEN)
        for j in range(n)
        if s == split and (folds is None or f in folds)
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [0, 2])
def test_train_equal_batches_on_uneven_shards(uneven, workers):
    out, index = uneven
    folds = folds_for(0, 3)  # validate on fold 0: train on 1 and 2 (17 + 5 + 9 = 31 samples)
    assert folds == [1, 2]
    counts, seen = [], set()
    for rank in range(2):
        loader = build_loader(
            out, "train", folds, rank, 2, workers, 4, epoch=0, transform=_train_tf(), seed=0, shuffle_buffer=16
        )
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        for b in batches:
            assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
            assert b["label"].dtype == torch.long and b["valid"].all()
            seen.update(b["key"])
    assert counts[0] == counts[1] == (4, 4)  # ceil(31 / (2 ranks * 4))
    assert seen <= _keys(index, "train", [1, 2])  # the validation fold never leaks into training


@pytest.mark.timeout(240)
def test_samples_per_epoch_sets_the_batch_count(uneven):
    out, _ = uneven
    lens = [
        len(build_loader(out, "train", [0, 1, 2], r, 2, 0, 5, 0, _train_tf(), 0, samples_per_epoch=100))
        for r in range(2)
    ]
    assert lens == [10, 10]
    loader = build_loader(out, "train", [0, 1, 2], 1, 2, 0, 5, 0, _train_tf(), 0, samples_per_epoch=100)
    assert sum(1 for _ in loader) == 10


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_sees_every_sample_exactly_once_with_flagged_padding(uneven, workers):
    out, index = uneven
    seen, lens = Counter(), []
    for rank in range(2):
        loader = build_loader(out, "val", None, rank, 2, workers, 4, 0, _eval_tf(), 0, mode="eval")
        batches = list(loader)
        lens.append((len(loader), len(batches)))
        for b in batches:
            assert len(b["key"]) == 4 and b["image"].shape == (4, 3, 32, 32)
            for key, valid in zip(b["key"], b["valid"].tolist()):
                if valid:
                    seen[key] += 1
                else:
                    assert key == ""
        rep = loader.report()
        assert rep["samples"] + rep["padding"] == 4 * len(loader) and rep["skipped"] == 0
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1]
    assert set(seen) == _keys(index, "val") and set(seen.values()) == {1}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "layout", [[("train", 0, 4), ("val", -1, 13)], [("train", 0, 4), ("val", -1, 6), ("val", -1, 7)]]
)
def test_eval_splits_inside_shards_when_they_are_fewer_than_streams(tmp_path, layout):
    """1 (or 2) val shards on 2 ranks x 2 workers: ranges inside the shards, every sample read exactly once."""
    index = write_tiny_shards(tmp_path, layout)
    want = {f"vals{i}i{j}" for i, (s, _, n) in enumerate(layout) for j in range(n) if s == "val"}
    seen, lens = Counter(), []
    for rank in range(2):
        loader = build_loader(tmp_path, "val", None, rank, 2, 2, 4, 0, _eval_tf(), 0, mode="eval")
        batches = list(loader)
        lens.append((len(loader), len(batches)))
        seen.update(k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v)
        assert loader.report()["skipped"] == 0
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1]
    assert set(seen) == want and set(seen.values()) == {1}
    pieces = plan_split(tmp_path, "val").eval_pieces(2, 2)
    per_stream = [sum(b - a for _, a, b in w) for r in pieces for w in r]
    assert sum(per_stream) == 13 and max(per_stream) - min(per_stream) <= 1  # 13 = 3 + 3 + 3 + 4
    assert len(index["shards"]) - 1 < 4  # fewer val shards than the 4 streams: ranges inside shards


def test_bad_split_fold_and_location_errors(uneven, tmp_path):
    out, _ = uneven
    with pytest.raises(DataError, match="split 'test' has no shards.*--test"):
        build_loader(out, "test", None, 0, 1, 0, 4, 0, _eval_tf(), 0, mode="eval")
    with pytest.raises(DataError, match=r"train folds \[7\].*folds present: \[0, 1, 2\]"):
        build_loader(out, "train", [7], 0, 1, 0, 4, 0, _train_tf(), 0)
    with pytest.raises(DataError, match="data.fold=3 but the shards have 3 folds"):
        folds_for(3, 3)
    with pytest.raises(DataError, match="no shard index at .*distrib shard"):
        read_index(tmp_path / "nowhere")


@pytest.mark.timeout(240)
def test_shuffle_is_deterministic_per_seed_and_epoch(uneven):
    out, _ = uneven

    def run(epoch, seed=0):
        b = list(build_loader(out, "train", [0, 1, 2], 0, 2, 0, 6, epoch, _train_tf(), seed, shuffle_buffer=32))
        return [k for x in b for k in x["key"]], torch.cat([x["image"] for x in b])

    keys0, img0 = run(0)
    keys0b, img0b = run(0)
    keys1, _ = run(1)
    keys_seed, _ = run(0, seed=5)
    assert keys0 == keys0b and torch.equal(img0, img0b)  # same order and the same augmentation
    assert keys0 != keys1 and keys0 != keys_seed


def test_keys_groups_and_labels_are_carried(uneven):
    out, _ = uneven
    loader = build_loader(out, "val", None, 0, 1, 0, 8, 0, _eval_tf(), 0, mode="eval")
    rows = [(k, g, int(lab)) for b in loader for k, g, lab, v in zip(b["key"], b["group"], b["label"], b["valid"]) if v]
    assert len(rows) == 29
    for key, group, label in rows:
        si, i = (int(x) for x in key.removeprefix("vals").split("i"))
        assert group == f"g{si}_{i // 4}" and label in (0, 1)


@pytest.mark.timeout(240)
def test_corrupt_members_are_counted_and_skipped(tmp_path, caplog):
    layout = [("train", 0, 12), ("train", 0, 10), ("val", -1, 10), ("val", -1, 10)]
    write_tiny_shards(tmp_path, layout, bad_jpeg={"f0s0i3", "vals2i4"})
    # cut the second val shard in the middle of its members (as a broken copy would)
    full = (tmp_path / "val-00001.tar").stat().st_size
    (tmp_path / "val-00001.tar").write_bytes((tmp_path / "val-00001.tar").read_bytes()[: full // 2 + 100])
    caplog.set_level("WARNING", logger="distrib.data.loader")
    for workers in (0, 1):
        lens, skipped, valid = [], 0, 0
        for rank in range(2):
            loader = build_loader(tmp_path, "val", None, rank, 2, workers, 4, 0, _eval_tf(), 0, mode="eval")
            batches = list(loader)
            lens.append((len(loader), len(batches)))
            rep = loader.report()
            skipped += rep["skipped"]
            valid += rep["samples"]
        assert lens[0] == lens[1] and lens[0][0] == lens[0][1]
        assert valid + skipped == 20 and skipped >= 2  # 1 bad JPEG + the truncated tail (index counts 20)
    assert "skipped" in caplog.text and "corrupt samples" in caplog.text
    # training: the bad JPEG is skipped and replaced, both ranks finish with the same full batches
    lens = []
    for rank in range(2):
        loader = build_loader(tmp_path, "train", [0], rank, 2, 0, 4, 0, _train_tf(), 0)
        batches = list(loader)
        assert all(b["valid"].all() and len(b["key"]) == 4 for b in batches)
        assert all("f0s0i3" not in b["key"] for b in batches)
        lens.append(len(batches))
    assert lens == [3, 3]


@pytest.mark.timeout(240)
def test_shards_over_http(uneven):
    out, index = uneven
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert read_index(url)["shards"][0]["path"] == index["shards"][0]["path"]
        seen = []
        for rank in range(2):
            loader = build_loader(url, "val", None, rank, 2, 0, 4, 0, _eval_tf(), 0, mode="eval")
            seen += [k for b in loader for k, v in zip(b["key"], b["valid"]) if v]
            assert loader.report()["skipped"] == 0
        assert sorted(seen) == sorted(_keys(index, "val"))
        train = build_loader(url, "train", [1, 2], 0, 1, 0, 4, 0, _train_tf(), 0)
        assert sum(1 for _ in train) == len(train) == 8
    finally:
        server.shutdown()
        server.server_close()


def test_pipe_location_reads_index_and_shards(uneven):
    """A `pipe:` location with a {} placeholder (as for `aws s3 cp s3://b/{} -`) streams via webdataset's gopen."""
    out, index = uneven
    loc = f"pipe:cat {out}/{{}}"
    assert read_index(loc)["shards"] == index["shards"]
    loader = build_loader(loc, "val", None, 0, 1, 0, 8, 0, _eval_tf(), 0, mode="eval")
    assert sorted(k for b in loader for k, v in zip(b["key"], b["valid"]) if v) == sorted(_keys(index, "val"))
    with pytest.raises(DataError, match="needs a '{}' placeholder"):
        read_index(f"pipe:cat {out}/index.json")


def test_fsspec_location(uneven):
    """Schemes webdataset's gopen lacks (s3://, gs://, ...) go through fsspec; memory:// stands in for them."""
    import fsspec

    out, index = uneven
    fs = fsspec.filesystem("memory")
    for f in out.iterdir():
        fs.pipe(f"/bucket/shards/{f.name}", f.read_bytes())
    loader = build_loader("memory://bucket/shards", "val", None, 0, 1, 0, 8, 0, _eval_tf(), 0, mode="eval")
    assert sorted(k for b in loader for k, v in zip(b["key"], b["valid"]) if v) == sorted(_keys(index, "val"))
    with pytest.raises(DataError, match="no shard index|cannot read shard index"):
        read_index("memory://bucket/elsewhere")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.mark.timeout(300)
def test_reads_the_real_shard_writer_output(demo_shards):
    """The shards written by distrib.data.shards.write_shards (conftest fixture) load in both modes."""
    index = read_index(demo_shards)
    n_val = sum(s["count"] for s in index["shards"] if s["split"] == "val")
    keys = []
    for rank in range(2):
        loader = build_loader(demo_shards, "val", None, rank, 2, 0, 8, 0, _eval_tf(), 0, mode="eval")
        keys += [k for b in loader for k, v in zip(b["key"], b["valid"]) if v]
    assert len(keys) == len(set(keys)) == n_val
    train = build_loader(demo_shards, "train", folds_for(0, index["folds"]), 0, 2, 0, 8, 0, _train_tf(), 0)
    groups = {g for b in train for g in b["group"]}
    assert groups and all(index["groups"][g] != 0 for g in groups)


@pytest.mark.timeout(300)
def test_bench_loader_prints_ratios_as_last_json_line(demo_shards, tmp_path, capsys):
    """`distrib bench loader` runs all three measurements in one go (timings are not asserted)."""
    import json

    from distrib.cli import main

    assert (
        main(
            [
                "bench",
                "loader",
                "--shards",
                str(demo_shards),
                "--workers",
                "0",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "scratch"),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in (
        "images_per_s",
        "ratio_to_decode_limit",
        "ratio_to_imagefolder",
        "decode_limit_images_per_s",
        "imagefolder_images_per_s",
    ):
        assert res[k] > 0
    assert res["images_timed"] == 2 * 32
    assert set(res["profile_us_per_image"]) >= {"tar_read", "jpeg_decode", "geometric"}
    (split,) = res["augment_on_model"]  # augment.device=model: uint8 CPU side, device augmentation, both
    assert split["img_size"] == 64 and split["cpu_side"]["ratio_to_decode_limit"] > 0
    assert len(split["cpu_side"]["ratio_per_round"]) == 3
    assert split["device_augment"]["images_per_s"] > 0 and split["together"]["images_per_s"] > 0
    assert split["device_augment"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert len(list((tmp_path / "scratch" / "imagefolder").rglob("*.jpg"))) == res["unique_images"]


@pytest.mark.timeout(120)
def test_training_on_unusable_shards_raises_instead_of_hanging(tmp_path):
    """The training stream is endless; with nothing decodable it must fail with a message, not spin."""
    bad = tmp_path / "bad"
    write_tiny_shards(
        bad, [("train", 0, 3), ("train", 0, 2)], bad_jpeg={"f0s0i0", "f0s0i1", "f0s0i2", "f0s1i0", "f0s1i1"}
    )
    with pytest.raises(DataError, match="in a row failed to decode.*distrib shard inspect"):
        list(build_loader(bad, "train", [0], 0, 1, 0, 2, 0, _train_tf(), 0))
    gone = tmp_path / "gone"
    write_tiny_shards(gone, [("train", 0, 3), ("train", 0, 2)])
    for tar in gone.glob("*.tar"):
        tar.unlink()
    with pytest.raises(DataError, match="shard reads in a row gave no samples.*FileNotFoundError"):
        list(build_loader(gone, "train", [0], 0, 1, 0, 2, 0, _train_tf(), 0))
    # eval over the same missing shards completes: every sample is counted as skipped, all rows padding
    loader = build_loader(gone, "train", [0], 0, 1, 0, 2, 0, _eval_tf(), 0, mode="eval")
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and not any(b["valid"].any() for b in batches)
    assert loader.report()["skipped_tar"] == 5
