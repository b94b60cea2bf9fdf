"""Issue 15, data side: bad or unusual input never silently changes the science.

Labels (explicit positive class), manifest columns and encodings, image modes, shard integrity
before training, one-line errors instead of tracebacks, and the minor items. Real manifests, images
and shards built in tmp_path; no mocks.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, REPO, subprocess_env
from distrib.config import ConfigError, load_config
from distrib.data.shards import write_shards
from distrib.errors import DataError, DistribError

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
UNWRITABLE = "/sys/distrib-test-out"  # mkdir fails with a PermissionError even for root


def _images(root: Path, n: int = 12) -> list[str]:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "img" / f"{i:02d}.png")
    return [f"img/{i:02d}.png" for i in range(n)]


def _csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _manifest(tmp_path: Path, labels: list[str], header=("path", "label", "group"), **kw) -> Path:
    paths = _images(tmp_path, len(labels))
    rows = [[p, lab, f"g{i % 6}"] for i, (p, lab) in enumerate(zip(paths, labels))]
    return _csv(tmp_path / "train.csv", list(header), [r[: len(header)] for r in rows], **kw)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "distrib", *args],
        cwd=REPO,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and all(n in err[0] for n in needles), proc.stderr[-2000:]


# 1. explicit positive class ------------------------------------------------------------------------


def test_positive_class_is_explicit_and_case_insensitive(tmp_path):
    labels = ["Real", "deepfake", "REAL", "Deepfake", "real", "DEEPFAKE"] * 2
    train = _manifest(tmp_path, labels)
    with pytest.raises(
        DataError,
        match=r"labels \['Real', 'deepfake'\] do not say which class is positive.*"
        r"--positive NAME",
    ):
        write_shards(train, tmp_path / "a", folds=3, workers=1)
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError, match=r"--positive 'fake' is not a label .*\['Real', 'deepfake'\]"):
        write_shards(train, tmp_path / "a", folds=3, workers=1, positive="fake")
    index = write_shards(train, tmp_path / "a", folds=3, workers=1, positive="DeepFake")
    assert index["classes"] == {"0": "Real", "1": "deepfake"} and index["positive"] == "deepfake"
    on_disk = json.loads((tmp_path / "a" / "index.json").read_text())
    assert on_disk["positive"] == "deepfake" and on_disk["split_label_counts"]["train"] == {"0": 6, "1": 6}
    # reversed polarity is a different shard set, not a silent no-op
    with pytest.raises(DataError, match="different manifests or settings"):
        write_shards(train, tmp_path / "a", folds=3, workers=1, positive="real")
    # the documented pair needs no flag, in any case: Fake = 1
    pair = _manifest(tmp_path / "b", ["Real", "FAKE", "real", "fake"] * 3)
    index = write_shards(pair, tmp_path / "b" / "shards", folds=3, workers=1)
    assert index["classes"] == {"0": "Real", "1": "FAKE"} and index["split_label_counts"]["train"] == {"0": 6, "1": 6}


def test_label_typo_third_class_names_the_row(tmp_path):
    labels = ["real", "fake"] * 6
    labels[7] = "fkae"
    with pytest.raises(
        DataError,
        match=r"train\.csv row 8: label 'fkae' makes a third class; labels must be "
        r"binary \(seen: 'fake' \(5 rows\), 'fkae' \(1 rows\), 'real' \(6 rows\)\)",
    ):
        write_shards(_manifest(tmp_path, labels), tmp_path / "s", folds=3, workers=1)
    ints = ["0", "1"] * 6
    ints[3] = "2"
    with pytest.raises(DataError, match=r"row 4: label '2' makes a third class"):
        write_shards(_manifest(tmp_path / "i", ints), tmp_path / "s", folds=3, workers=1)
    assert not (tmp_path / "s").exists()


def test_data_classes_must_match_the_index(demo_shards, tmp_path):
    from distrib.training.setup import preflight

    cfg = load_config(DEBUG, [f"data.shards={demo_shards}", "data.classes={negative: fake, positive: real}"])
    with pytest.raises(DataError, match=r"maps labels as \{'0': 'real', '1': 'fake'\}.*--positive real"):
        preflight(cfg, tmp_path / "run", resume=False)
    assert not (tmp_path / "run").exists()
    ok = load_config(DEBUG, [f"data.shards={demo_shards}", "data.classes={negative: REAL, positive: Fake}"])
    preflight(ok, tmp_path / "run", resume=False)
    with pytest.raises(ConfigError, match="data.classes"):
        load_config(DEBUG, ["data.classes={positive: fake}"])


# 2. manifest columns and encodings ------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, pattern",
    [
        (("path", "label", "Group"), r"column 'Group' must be spelled exactly 'group' .*rename it"),
        (("path", " label", "group"), r"column ' label' must be spelled exactly 'label'"),
        (("path", "label", "video"), r"column 'video' looks like a group id.*rename 'video' to 'group'"),
        (("path", "label", "group_id"), r"column 'group_id' looks like a group id"),
    ],
)
def test_manifest_columns_match_exactly_or_fail(header, pattern, tmp_path):
    train = _manifest(tmp_path, ["real", "fake"] * 6, header=header)
    with pytest.raises(DataError, match=pattern):
        write_shards(train, tmp_path / "s", folds=3, workers=1)
    assert not (tmp_path / "s").exists()


def test_bom_accepted_and_non_utf8_is_one_line(tmp_path):
    train = _manifest(tmp_path, ["real", "fake"] * 6, encoding="utf-8-sig")
    assert train.read_bytes()[:3] == b"\xef\xbb\xbf"
    index = write_shards(train, tmp_path / "s", folds=3, workers=1)
    assert len(index["groups"]) == 6, "the BOM must not hide the 'path' column or the groups"
    latin = tmp_path / "latin.csv"
    latin.write_bytes(train.read_bytes()[3:].replace(b"img/00.png", "img/caf\xe9.png".encode("latin-1")))
    proc = _cli(tmp_path, "shard", "--train", str(latin), "--out", str(tmp_path / "t"), "--folds", "3")
    _one_line_error(proc, "latin.csv is not UTF-8 text", "save it as UTF-8")
    assert not (tmp_path / "t").exists()


# 3. image modes -----------------------------------------------------------------------------------


def _reference(mode: str, a: np.ndarray) -> np.ndarray:
    """Independent reference conversions (numpy) for the modes data.images documents."""
    a = a.astype(np.float64)
    if mode.startswith("I;16") or mode == "I":
        g = np.rint(a / 65535 * 255)
    elif mode == "F":
        g = np.rint((a - a.min()) / (a.max() - a.min()) * 255)
    elif mode == "CMYK":
        return np.rint((255 - a[..., :3]) * (255 - a[..., 3:]) / 255).astype(np.uint8)
    elif mode in ("LA", "RGBA"):
        rgb = np.repeat(a[..., :1], 3, axis=2) if mode == "LA" else a[..., :3]
        return np.rint(rgb * a[..., -1:] / 255).astype(np.uint8)
    return np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_each_image_mode_matches_its_reference_conversion(tmp_path):
    from distrib.data.images import to_rgb8
    from distrib.data.transforms import decode_image

    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 65536, (9, 7)).astype(np.uint16)
    cases = {
        "I;16": (Image.fromarray(u16), u16),
        "I;16B": (Image.frombytes("I;16B", (7, 9), u16.astype(">u2").tobytes()), u16),
        "I": (Image.fromarray(u16.astype(np.int32)), u16),
        "F": (Image.fromarray(rng.normal(0, 50, (9, 7)).astype(np.float32)), None),
        "CMYK": (Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "CMYK"), None),
        "LA": (Image.fromarray(rng.integers(0, 256, (9, 7, 2), dtype=np.uint8), "LA"), None),
        "RGBA": (Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA"), None),
    }
    for mode, (im, src) in cases.items():
        assert im.mode == mode
        ref = _reference(mode, np.asarray(im) if src is None else src)
        np.testing.assert_array_equal(to_rgb8(im), ref, err_msg=mode)
        buf = io.BytesIO()  # the decoder (PNG/TIFF members) applies the same conversion
        im.save(buf, "TIFF")
        np.testing.assert_array_equal(decode_image(buf.getvalue()), ref, err_msg=f"{mode} via decode_image")
    # palette: its colours; with transparency: RGBA composited on black
    pal = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).quantize(16)
    np.testing.assert_array_equal(to_rgb8(pal), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    np.testing.assert_array_equal(to_rgb8(pal), _reference("RGBA", np.asarray(pal.convert("RGBA"))))
    # the case end to end: a mid-grey 16-bit PNG keeps its mean through the shard (was 254)
    _images(tmp_path, 12)
    Image.fromarray(np.full((32, 32), 127 * 257, np.uint16)).save(tmp_path / "img" / "00.png")
    cmyk = Image.fromarray(np.dstack([np.full((32, 32), v, np.uint8) for v in (0, 255, 255, 0)]), "CMYK")
    cmyk.save(tmp_path / "img" / "01.jpg")  # a CMYK JPEG is re-encoded, not copied
    rows = [[f"img/{i:02d}.{'jpg' if i == 1 else 'png'}", "real" if i % 2 else "fake", f"g{i % 6}"] for i in range(12)]
    index = write_shards(_csv(tmp_path / "m.csv", ["path", "label", "group"], rows), tmp_path / "s", folds=3, workers=1)
    got = {}
    for s in index["shards"]:
        with tarfile.open(tmp_path / "s" / s["path"]) as tar:
            got.update({m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")})
    assert abs(decode_image(got["img__00.jpg"]).mean() - 127) < 1.5
    assert np.abs(decode_image(got["img__01.jpg"]).astype(int) - [255, 0, 0]).max() <= 3  # C=0,M=Y=255: red


# 4. training trusts nothing it has not checked ------------------------------------------------------


def _copy(demo_shards: Path, tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    return shards


def test_preflight_verifies_every_shard(demo_shards, tmp_path):
    from distrib.training.setup import preflight

    def check(shards, *over):
        preflight(load_config(DEBUG, [f"data.shards={shards}", *over]), tmp_path / "run", resume=False)

    shards = _copy(demo_shards, tmp_path)
    val = sorted(shards.glob("val-*.tar"))[0]
    data = bytearray(val.read_bytes())
    data[2000] ^= 0xFF  # same size, one flipped byte
    val.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val-00000\.tar has a sha256 that differs .*data.verify=full"):
        check(shards)  # auto = full for a small dir
    check(shards, "data.verify=size")  # size + header cannot see a flipped byte inside a member
    val.write_bytes(bytes(data[:-1024]))
    with pytest.raises(DataError, match=r"val-00000\.tar is \d+ bytes, index.json says \d+ \(data.verify=size\)"):
        check(shards, "data.verify=size")
    val.write_bytes(b"\1" * len(data))
    with pytest.raises(DataError, match=r"first tar header is invalid"):
        check(shards, "data.verify=size")
    val.unlink()
    with pytest.raises(DataError, match=r"1 shard\(s\) listed in .*index.json are missing, first: .*val-00000\.tar"):
        check(shards, "data.verify=size")


@pytest.mark.timeout(300)
def test_max_skipped_fraction_fails_the_run_with_the_count(demo_shards, tmp_path):
    from distrib.training.trainer import run

    shards = _copy(demo_shards, tmp_path)
    src = shards / "train-f1-00000.tar"
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(src, "w", format=tarfile.USTAR_FORMAT) as tar:
        broken = 0
        for m, data in members:
            if m.name.endswith(".jpg") and broken < 3:  # undecodable, same size: the tar stays valid
                data, broken = b"\0" * len(data), broken + 1
            tar.addfile(m, io.BytesIO(data))
    over = [
        f"data.shards={shards}",
        "data.verify=size",
        "train.epochs=1",
        "train.latency_batches=1",
        "data.shuffle_buffer=8",
    ]
    with pytest.raises(
        DataError,
        match=r"skipped [1-3] corrupt train samples of \d+ read .*"
        r"train.max_skipped_fraction=0.001",
    ):
        run(load_config(DEBUG, over + ["train.max_skipped_fraction=0.001"]), tmp_path / "strict")
    res = json.loads((tmp_path / "strict" / "evaluation_results.json").read_text())
    assert res["skipped_samples"]["train"] >= 1  # outputs are written, then the run fails
    assert res["classes"] == {"0": "real", "1": "fake"} and res["positive"] == "fake"
    # (test_train's corrupt-sample test runs the same shards under a lenient fraction to success)


# 5. one-line errors instead of tracebacks -----------------------------------------------------------


def test_unwritable_out_and_corrupt_index_are_one_line_errors(demo_data, demo_shards, tmp_path):
    train = str(demo_data / "train_manifest.csv")
    proc = _cli(tmp_path, "shard", "--train", train, "--out", UNWRITABLE, "--folds", "3")
    _one_line_error(proc, f"cannot write to --out {UNWRITABLE}", "choose a directory you can write to")
    proc = _cli(tmp_path, "train", str(DEBUG), "--out", f"{UNWRITABLE}/run", f"data.shards={demo_shards}")
    _one_line_error(proc, f"cannot write to --out {UNWRITABLE}/run")
    shards = _copy(demo_shards, tmp_path)
    (shards / "index.json").write_text('{"shards": [')
    proc = _cli(tmp_path, "shard", "--train", train, "--out", str(shards), "--folds", "3")
    _one_line_error(proc, "index.json is corrupt (JSONDecodeError", "pass --overwrite")


def test_demo_images_with_an_unreadable_photo_fails_naming_it(tmp_path):
    from distrib.demo.data import build_demo_dataset

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    (photos / "broken.jpg").write_bytes(b"this is not a JPEG")
    with pytest.raises(
        DataError,
        match=r"1 photo\(s\) cannot be read, first: .*broken\.jpg is unreadable "
        r"\(UnidentifiedImageError.*remove or re-save them",
    ):
        build_demo_dataset(tmp_path / "out", images=photos, size="tiny")
    assert not (tmp_path / "out").exists()


# 6. minor items ------------------------------------------------------------------------------------


def test_thresholds_refuse_percent_probabilities(tmp_path):
    from distrib.stacking.thresholds import load_predictions

    pred = _csv(tmp_path / "p.csv", ["label", "prob"], [[0, 12.5], [1, 87.5], [0, 3.0], [1, 99.0]])
    with pytest.raises(
        DataError, match=r"prob must be a probability in 0\.\.1.*max 99.*0-100 percentage\? divide by 100"
    ):
        load_predictions(pred)


def test_closest_key_prefers_the_abbreviation():
    for key, want in (
        ("optim.learning_rate", "optim.lr"),
        ("optim.wd", "optim.weight_decay"),
        ("optim.lr_min", "optim.min_lr"),
        ("train.epoch", "train.epochs"),
    ):
        with pytest.raises(ConfigError, match=f"did you mean '{want}'"):
            load_config(None, [f"{key}=1"])


def test_missing_base_names_the_referring_yaml(tmp_path):
    child = tmp_path / "exp.yaml"
    child.write_text("base: nowhere.yaml\nname: x\n")
    with pytest.raises(
        ConfigError,
        match=r"config file not found: .*nowhere\.yaml \(named by 'base: nowhere\.yaml'"
        r" in .*exp\.yaml",
    ):
        load_config(child)


def test_failed_validation_leaves_no_output_dir(demo_shards, tmp_path):
    from distrib.training.setup import preflight

    with pytest.raises(DistribError, match="unknown model name"):
        preflight(load_config(DEBUG, [f"data.shards={demo_shards}", "model.name=resnet5O"]), tmp_path / "run", False)
    with pytest.raises(DataError, match="do not say which class"):
        write_shards(_manifest(tmp_path, ["cat", "dog"] * 6), tmp_path / "shards", folds=3, workers=1)
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()


def test_cascade_report_names_the_positive_class(tmp_path):
    from distrib.cascade.report import write_report

    cost = {
        "stage1_mean_ms": 1.0,
        "stage1_p95_ms": 1.0,
        "cascade_mean_ms": 1.0,
        "cascade_p95_ms": 1.0,
        "cost_ratio_to_stage1": 1.0,
        "note": "model compute",
    }
    band = {"message": "band", "feasible": True, "t_low": 0.1, "t_high": 0.9}
    results = {
        "name": "c",
        "split": "test",
        "n": 10,
        "positives": 4,
        "escalation_rate": 0.1,
        "escalated": 1,
        "metrics": {"cascade": {"auc": 0.9}},
        "cost": cost,
        "plots": {},
        "thresholds": {
            "stage1_band": band,
            "meta_rule": "mean",
            "meta_threshold": 0.5,
            "stage1_single_youden": 0.5,
            "experts_youden_oof": {},
        },
        "classes": {"0": "Real", "1": "deepfake"},
        "positive": "deepfake",
    }
    text = write_report(results, tmp_path).read_text()
    assert "Positive class (label 1): **deepfake**; classes 0 = Real, 1 = deepfake." in text


def test_integer_labels_keep_neutral_names_unless_the_user_names_them(tmp_path):
    from distrib.cli import main as cli_main

    ints = _manifest(tmp_path / "i", ["0", "1"] * 6)
    index = write_shards(ints, tmp_path / "ints", folds=3, workers=1)
    assert index["classes"] == {"0": "negative", "1": "positive"} and index["positive"] == "positive"
    named = write_shards(ints, tmp_path / "named", folds=3, workers=1, names="negative=clean,positive=pit")
    assert named["classes"] == {"0": "clean", "1": "pit"} and named["positive"] == "pit"
    on_disk = json.loads((tmp_path / "named" / "index.json").read_text())
    assert on_disk["classes"] == {"0": "clean", "1": "pit"}
    # only manifests that say real/fake are called so
    words = _manifest(tmp_path / "w", ["real", "fake"] * 6)
    assert write_shards(words, tmp_path / "words", folds=3, workers=1)["classes"] == {"0": "real", "1": "fake"}
    # the CLI flag, and a malformed one is one clear error
    assert (
        cli_main(
            [
                "shard",
                "--train",
                str(ints),
                "--out",
                str(tmp_path / "cli"),
                "--folds",
                "3",
                "--workers",
                "1",
                "--names",
                "negative=clean,positive=pit",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["positive"] == "pit"
    with pytest.raises(DataError, match=r"negative=NAME,positive=NAME"):
        write_shards(ints, tmp_path / "bad", folds=3, workers=1, names="clean,pit")
    # names on labels that already name themselves must agree: demo.yaml's real/fake on cat/dog manifests once
    # relabelled every report silently
    pets = _manifest(tmp_path / "p", ["cat", "dog"] * 6)
    with pytest.raises(DataError, match=r"labels are 'cat' \(0\) and 'dog' \(1\).*'real' and 'fake'.*data.classes"):
        write_shards(pets, tmp_path / "pets", folds=3, workers=1, positive="dog", names="negative=real,positive=fake")
    assert not (tmp_path / "pets" / "index.json").exists()
    same = write_shards(words, tmp_path / "same", folds=3, workers=1, names="negative=Real,positive=Fake")
    assert same["classes"] == {"0": "Real", "1": "Fake"}


@pytest.mark.parametrize("how", ["copy", "dotdot", "symlink"])
def test_a_train_image_in_test_through_a_copy_is_a_leak(tmp_path, how):
    import os

    train = _manifest(tmp_path / "tr", ["real", "fake"] * 6)
    rows = list(csv.reader(open(train)))
    img = tmp_path / "tr" / rows[1][0] if not os.path.isabs(rows[1][0]) else Path(rows[1][0])
    other = tmp_path / "te"
    other.mkdir()
    if how == "copy":
        shutil.copyfile(img, other / "copy.png")
        ref = str(other / "copy.png")
    elif how == "dotdot":
        ref = str(other / ".." / "tr" / Path(img).relative_to(tmp_path / "tr"))
    else:
        os.symlink(img, other / "link.png")
        ref = str(other / "link.png")
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(other / "unique.png")  # test needs both classes
    test = _csv(
        other / "test.csv", ["path", "label", "group"], [[ref, "real", "e1"], [str(other / "unique.png"), "fake", "e2"]]
    )
    with pytest.raises(DataError, match=r"train\) and .*test\.csv row 1 .*(same file|byte-identical)"):
        write_shards(train, tmp_path / "out", test=test, folds=3, workers=1)


def test_a_repeated_image_within_one_split_is_a_counted_warning(tmp_path, caplog):
    from distrib.data.manifest import check_copies

    train = _manifest(tmp_path, ["real", "fake"] * 6)
    rows = [
        {**r, "split": "train"}
        for r in __import__("distrib.data.manifest", fromlist=["x"]).read_manifest(train, "train")
    ]
    rows.append({**rows[0], "row": 99})
    with caplog.at_level("WARNING", logger="distrib"):
        assert check_copies(rows) == 1
    assert "1 row(s) repeat the bytes" in caplog.text


def test_a_val_split_with_one_class_is_an_error_at_shard_time(tmp_path):
    train = _manifest(tmp_path / "tr", ["real", "fake"] * 6)
    (tmp_path / "va").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 + i, np.uint8)).save(tmp_path / "va" / f"v{i}.png")
    val = _csv(
        tmp_path / "va" / "val.csv", ["path", "label", "group"], [[f"v{i}.png", "real", f"v{i}"] for i in range(4)]
    )
    with pytest.raises(DataError, match=r"the val split has only class 'real'.*Add rows of the other class"):
        write_shards(train, tmp_path / "out", val=val, folds=3, workers=1)
    assert not (tmp_path / "out" / "index.json").exists()
