"""Shard writer and inspector on real tar files: read-back, fold/group separation, checksums, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, REPO, subprocess_env
from distrib.cli import main as cli_main
from distrib.data.shards import format_inspection, inspect_shards, write_shards
from distrib.errors import DataError


def _members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out[key][ext] = tar.extractfile(m).read()
    return out


def _manifest_rows(demo_data: Path) -> list[dict]:
    rows = []
    for split in ("train", "val", "test"):
        with open(demo_data / f"{split}_manifest.csv", newline="") as f:
            rows += [{**r, "split": split} for r in csv.DictReader(f)]
    return rows


def test_shards_read_back_with_tarfile(demo_shards, demo_data):
    index = json.loads((demo_shards / "index.json").read_text())
    assert index["folds"] == 3 and index["seed"] == 0
    assert index["classes"] == {"0": "real", "1": "fake"}
    seen = {}
    for entry in index["shards"]:
        members = _members(demo_shards / entry["path"])
        assert len(members) == entry["count"]
        prefix = f"train-f{entry['fold']}-" if entry["split"] == "train" else f"{entry['split']}-"
        assert entry["path"].startswith(prefix)
        for key, m in members.items():
            assert set(m) == {"jpg", "cls", "json"} and "." not in key
            meta = json.loads(m["json"])
            assert meta["key"] == key and meta["fold"] == entry["fold"] and meta["split"] == entry["split"]
            assert int(m["cls"]) == meta["label"]
            assert m["jpg"] == (demo_data / meta["source_path"]).read_bytes(), "JPEGs keep their original bytes"
            assert key not in seen
            seen[key] = meta
    rows = _manifest_rows(demo_data)
    assert sorted(m["source_path"] for m in seen.values()) == sorted(r["path"] for r in rows)
    by_path = {m["source_path"]: m for m in seen.values()}
    for r in rows:
        assert by_path[r["path"]]["label"] == int(r["label"]) and by_path[r["path"]]["group"] == r["group"]
    assert index["split_counts"] == dict(Counter(r["split"] for r in rows))


def test_shards_read_back_with_webdataset(demo_shards):
    import webdataset as wds

    index = json.loads((demo_shards / "index.json").read_text())
    urls = [str(demo_shards / s["path"]) for s in index["shards"] if s["split"] == "val"]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb")
    samples = list(ds)
    assert len(samples) == index["split_counts"]["val"]
    for s in samples[:10]:
        assert s["jpg"].shape == (64, 64, 3) and s["json"]["fold"] == -1 and s["cls"] in (0, 1)


def test_no_group_in_two_folds_and_labels_stratified(demo_shards):
    index = json.loads((demo_shards / "index.json").read_text())
    fold_of: dict[str, set] = defaultdict(set)
    labels: dict[int, Counter] = defaultdict(Counter)
    for entry in index["shards"]:
        for m in _members(demo_shards / entry["path"]).values():
            meta = json.loads(m["json"])
            fold_of[meta["group"]].add((meta["split"], meta["fold"]))
            labels[meta["fold"]][meta["label"]] += 1
    assert all(len(f) == 1 for f in fold_of.values()), "a group landed in two folds/splits"
    train_groups = {g for g, f in fold_of.items() if next(iter(f))[0] == "train"}
    assert set(index["groups"]) == train_groups
    assert {index["groups"][g] for g in train_groups} == {0, 1, 2}
    for groups in index["heldout_groups"].values():
        assert not set(groups) & train_groups
    overall = sum(labels[k][1] for k in range(3)) / sum(sum(labels[k].values()) for k in range(3))
    for k in range(3):
        n = sum(labels[k].values())
        assert abs(labels[k][1] / n - overall) < 0.1, f"fold {k} label mix {labels[k]} vs {overall:.2f}"
        assert index["fold_label_counts"][str(k)] == {"0": labels[k][0], "1": labels[k][1]}


def test_inspect_verifies_checksums_and_detects_corruption(demo_shards, tmp_path, capsys):
    good = inspect_shards(demo_shards)
    assert good["ok"] and not good["problems"]
    assert all(r["sha256_ok"] and r["found"] == r["count"] for r in good["shards"])
    assert "sha256" in format_inspection(good)  # the table 'distrib shard inspect' prints
    bad_dir = tmp_path / "shards"
    shutil.copytree(demo_shards, bad_dir)
    victim = bad_dir / "val-00000.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # flip one byte inside the first JPEG: the tar still parses, the hash does not match
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val-00000\.tar: sha256 differs"):
        inspect_shards(bad_dir)
    truncated = bad_dir / "test-00000.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    report = inspect_shards(bad_dir, strict=False)
    assert not report["ok"]
    bad = {r["path"] for r in report["shards"] if r["problems"]}
    assert bad == {"val-00000.tar", "test-00000.tar"}


def _tiny_copy(demo_data: Path, tmp_path: Path, n: int = 24) -> Path:
    """A small train manifest over real demo tiles (4 groups x 6 tiles), copied into tmp_path."""
    rows = [r for r in _manifest_rows(demo_data) if r["split"] == "train"]
    by_group: dict[str, list] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    picked = [r for g in sorted(by_group)[:4] for r in by_group[g][: n // 4]]
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for i, r in enumerate(picked):
            shutil.copy(demo_data / r["path"], root / "img" / f"{i:03d}.jpg")
            w.writerow([f"img/{i:03d}.jpg", r["label"], r["group"]])
    return root


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _train_rows(root: Path) -> list[list[str]]:
    with open(root / "train.csv", newline="") as f:
        return [[r["path"], r["label"], r["group"]] for r in csv.DictReader(f)]


BAD_CASES = {
    "missing_column": (
        lambda root, rows: _write_csv(root / "m.csv", ["path", "lbl"], [r[:2] for r in rows]),
        {},
        r"m\.csv: missing column 'label'.*header with columns path,label",
    ),
    "missing_image": (
        lambda root, rows: _write_csv(
            root / "m.csv", ["path", "label", "group"], rows[:3] + [["img/nope.jpg", "1", "gx"]] + rows[3:]
        ),
        {},
        r"m\.csv row 4: .*nope\.jpg is missing.*fix the paths",
    ),
    "unknown_label": (
        None,
        {
            "val": lambda root, rows: _write_csv(
                root / "v.csv", ["path", "label", "group"], [["img/000.jpg", "2", "gv"]]
            )
        },
        r"v\.csv row 1: unknown label '2'; the train manifest only has \['0', '1'\]",
    ),
    "duplicate_key": (
        lambda root, rows: _write_csv(root / "m.csv", ["path", "label", "group"], rows + [rows[0]]),
        {},
        r"duplicate key 'img__000': .*m\.csv row 1 .* row 25",
    ),
    "empty": (
        lambda root, rows: _write_csv(root / "m.csv", ["path", "label", "group"], []),
        {},
        r"m\.csv: the manifest has a header but no rows",
    ),
    "too_few_groups": (
        lambda root, rows: _write_csv(
            root / "m.csv",
            ["path", "label", "group"],
            [[p, lab, "g1" if i % 2 else "g2"] for i, (p, lab, _) in enumerate(rows)],
        ),
        {},
        r"m\.csv: 2 group\(s\) but folds=3; .*--folds 2",
    ),
    "mixed_labels": (
        lambda root, rows: _write_csv(
            root / "m.csv", ["path", "label", "group"], rows[:-1] + [[rows[-1][0], "fake", rows[-1][2]]]
        ),
        {},
        r"row 24: label 'fake' mixes integer labels and class names",
    ),
    "group_in_two_splits": (
        None,
        {
            "test": lambda root, rows: _write_csv(
                root / "t.csv", ["path", "label", "group"], [["img/extra.jpg", "0", rows[0][2]]]
            )
        },
        r"group '.*' appears in train .* and test .*move all its rows",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_before_writing(case, demo_data, tmp_path):
    root = _tiny_copy(demo_data, tmp_path)
    rows = _train_rows(root)
    shutil.copy(root / "img" / "000.jpg", root / "img" / "extra.jpg")
    make_train, extra, pattern = BAD_CASES[case]
    train = make_train(root, rows) if make_train else root / "train.csv"
    kwargs = {split: make(root, rows) for split, make in extra.items()}
    out = tmp_path / "shards"
    with pytest.raises(DataError, match="(?s)" + pattern):
        write_shards(train, out, folds=3, seed=0, workers=1, **kwargs)
    assert not out.exists(), "nothing may be written before validation passes"


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_image_names_the_row(content, demo_data, tmp_path):
    root = _tiny_copy(demo_data, tmp_path)
    victim = root / "img" / "005.jpg"
    victim.write_bytes(victim.read_bytes()[:400] if content == "truncated" else content)
    with pytest.raises(DataError, match=r"train\.csv row 6: .*005\.jpg is unreadable"):
        write_shards(root / "train.csv", tmp_path / "shards", folds=3, workers=1)
    assert not (tmp_path / "shards").exists()


def test_rerun_is_noop_settings_change_needs_overwrite(demo_data, tmp_path):
    root = _tiny_copy(demo_data, tmp_path)
    out = tmp_path / "shards"
    first = write_shards(root / "train.csv", out, folds=3, seed=1, shard_size=5, workers=1)
    assert first["written"] and all(s["count"] <= 5 for s in first["shards"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = write_shards(root / "train.csv", out, folds=3, seed=1, shard_size=5, workers=1)
    assert not again["written"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(DataError, match="different manifests or settings.*--overwrite"):
        write_shards(root / "train.csv", out, folds=2, seed=1, workers=1)
    redo = write_shards(root / "train.csv", out, folds=2, seed=1, workers=1, overwrite=True)
    assert redo["written"] and redo["folds"] == 2
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["path"] for s in redo["shards"])
    assert not list(out.glob(".*tmp*")), "no temp files are left behind"


@pytest.mark.timeout(180)
def test_parallel_writer_matches_serial_and_respects_byte_budget(demo_data, tmp_path):
    root = _tiny_copy(demo_data, tmp_path)
    serial = write_shards(root / "train.csv", tmp_path / "a", folds=3, shard_bytes=20_000, workers=1)
    parallel = write_shards(root / "train.csv", tmp_path / "b", folds=3, shard_bytes=20_000, workers=2)
    strip = lambda idx: [(s["path"], s["count"], s["sha256"]) for s in idx["shards"]]  # noqa: E731
    assert strip(serial) == strip(parallel), "worker count must not change the shards"
    assert len(serial["shards"]) > 3, "the byte budget must split folds into several shards"
    assert all(s["bytes"] <= 20_000 + 4096 for s in serial["shards"])


def test_png_inputs_name_labels_and_default_groups(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "png").mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "png" / f"im.{i}.png")
        rows.append([f"png/im.{i}.png", "fake" if i % 2 else "real"])
    train = _write_csv(tmp_path / "train.csv", ["path", "label"], rows)
    index = write_shards(train, tmp_path / "shards", folds=3, workers=1)
    assert index["classes"] == {"0": "real", "1": "fake"}
    assert set(index["groups"]) == {r[0] for r in rows}, "group defaults to the path"
    members = {k: m for s in index["shards"] for k, m in _members(tmp_path / "shards" / s["path"]).items()}
    assert "png__im_3" in members
    m = members["png__im_3"]
    assert m["jpg"][:3] == b"\xff\xd8\xff" and m["cls"] == b"1"
    assert json.loads(m["json"])["source_path"] == "png/im.3.png"


def test_cli_and_entry_points_reach_the_same_functions(demo_data, tmp_path, capsys):
    root = _tiny_copy(demo_data, tmp_path)
    out = tmp_path / "shards"
    assert (
        cli_main(["shard", "--train", str(root / "train.csv"), "--out", str(out), "--folds", "3", "--workers", "1"])
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] is True
    assert cli_main(["shard", "inspect", str(out)]) == 0
    assert "3 problem" not in capsys.readouterr().out
    assert cli_main(["shard", "--train", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "missing.csv does not exist" in capsys.readouterr().err
    proc = subprocess.run(
        [PYTHON, str(REPO / "shards" / "inspect_shards.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "0 problem(s)" in proc.stdout


@pytest.mark.timeout(120)
def test_inspect_over_http(demo_shards):
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output readable
            pass

    handler = functools.partial(Quiet, directory=str(demo_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        report = inspect_shards(f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
        server.server_close()
    assert report["ok"] and report["location"].startswith("http://127.0.0.1")
    local = inspect_shards(demo_shards)
    assert [(r["path"], r["found"]) for r in report["shards"]] == [(r["path"], r["found"]) for r in local["shards"]]


def test_overwrite_on_a_full_disk_keeps_the_old_set_whole(tiny_tmpfs, tmp_path):
    from distrib.data.shards import inspect_shards

    rng = np.random.default_rng(0)

    def manifest(name: str, n: int) -> Path:
        root = tmp_path / name
        root.mkdir()
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(root / f"{name}{i}.png")
            rows.append([f"{name}{i}.png", "fake" if i % 2 else "real", f"{name}g{i}"])
        return _write_csv(root / "m.csv", ["path", "label", "group"], rows)

    out = tiny_tmpfs / "shards"
    small, big = manifest("small", 6), manifest("big", 40)  # ~2 MB fits the 8 MiB disk; ~16 MB does not
    cmd = [sys.executable, "-m", "distrib", "shard", "--out", str(out), "--folds", "2", "--workers", "1"]
    assert subprocess.run([*cmd, "--train", str(small)], capture_output=True, text=True).returncode == 0
    before = json.loads((out / "index.json").read_text())
    proc = subprocess.run([*cmd, "--train", str(big), "--overwrite"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "no space left" in proc.stderr
    assert json.loads((out / "index.json").read_text()) == before  # the old set, whole and usable
    assert not inspect_shards(str(out), strict=False)["problems"]
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["shards"]  # the half-written new set is gone
