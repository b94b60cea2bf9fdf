"""distrib predict / export on a real tiny trained run: folders with bad files, clear errors, ONNX vs PyTorch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO
from distrib.cli import main as cli_main
from distrib.config import load_config
from distrib.errors import DataError
from distrib.inference.predict import predict

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"


@pytest.fixture(scope="module")
def tiny_run(demo_shards, tmp_path_factory):
    from distrib.training.trainer import run

    out = tmp_path_factory.mktemp("predict_run") / "run"
    cfg = load_config(
        DEBUG,
        [
            f"data.shards={demo_shards}",
            "data.fold=-1",
            "train.epochs=1",
            "data.samples_per_epoch=32",
            "train.latency_batches=1",
        ],
    )
    run(cfg, out)
    return out


def test_empty_folder_and_missing_model_are_clear_errors(demo_data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files.*empty"):
        predict(tmp_path / "empty", tmp_path / "empty", tmp_path / "p.csv")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(DataError, match="best_model.pth"):
        predict(tmp_path / "not_a_run", demo_data / "images", tmp_path / "p.csv")
    assert (
        cli_main(
            [
                "predict",
                "--model",
                str(tmp_path / "not_a_run"),
                "--images",
                str(demo_data / "images"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 2
    )


def test_export_refuses_bad_requests_before_loading(tmp_path):
    from distrib.errors import DistribError
    from distrib.inference.export import export_run

    with pytest.raises(DistribError, match="--int8 .*--format onnx"):
        export_run(tmp_path, fmt="torchscript", int8=True)
    with pytest.raises(DataError, match="best_model.pth"):
        export_run(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_folder_skips_corrupt_and_non_images(tiny_run, demo_data, tmp_path, capsys):
    test = pd.read_csv(demo_data / "test_manifest.csv").head(6)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    good = []
    for i, rel in enumerate(test["path"]):
        if i % 2:  # half as PNG, in a sub folder
            dst = folder / "sub" / f"img{i}.png"
            Image.open(demo_data / rel).save(dst)
        else:
            dst = folder / f"img{i}.jpg"
            shutil.copyfile(demo_data / rel, dst)
        good.append(str(dst))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out" / "preds.csv"
    assert (
        cli_main(
            [
                "predict",
                "--model",
                str(tiny_run),
                "--images",
                str(folder),
                "--out",
                str(out),
                "--workers",
                "2",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    preds = pd.read_csv(out)
    assert sorted(preds["path"]) == sorted(good) and res["n"] == len(good) and res["skipped"] == 2
    assert preds["prob"].between(0, 1).all() and set(preds["decision"]) <= {0, 1}
    skipped = pd.read_csv(out.parent / "preds_skipped.csv")  # named after --out, like _groups.csv
    assert res["skipped_csv"] == str(out.parent / "preds_skipped.csv")
    assert json.loads((out.parent / "preds_summary.json").read_text()) == res  # the summary file = the JSON line
    assert sorted(skipped["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["corrupt.jpg", "notes.txt"]
    assert skipped["reason"].str.len().min() > 10 and res["images_per_s"] > 0

    # the same images through a CSV list with groups and labels: identical probabilities, metrics and group scores
    lst = pd.DataFrame({"path": good, "group": test["group"], "label": test["label"]})
    lst.to_csv(tmp_path / "list.csv", index=False)
    res2 = predict(tiny_run, tmp_path / "list.csv", tmp_path / "out2" / "preds.csv")
    p2 = pd.read_csv(tmp_path / "out2" / "preds.csv")
    merged = preds.merge(p2, on="path")
    assert len(merged) == len(good) and np.abs(merged["prob_x"] - merged["prob_y"]).max() < 1e-6
    assert 0 <= res2["metrics"]["run"]["auc"] <= 1 and res2["n_groups"] == test["group"].nunique()
    assert len(pd.read_csv(res2["groups_csv"])) == test["group"].nunique()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_on_shards_equals_the_runs_own_evaluation(tiny_run, demo_shards, tmp_path):
    res = predict(tiny_run, demo_shards, tmp_path / "val.csv", split="val")
    preds = pd.read_csv(tmp_path / "val.csv")
    saved = pd.read_csv(tiny_run / "val_predictions.csv")
    merged = saved.merge(preds, left_on="key", right_on="path")
    assert len(merged) == len(saved) == res["n"]
    assert np.abs(merged["prob_x"] - merged["prob_y"]).max() < 1e-6


def test_predict_csv_maps_real_fake_labels_and_refuses_other_names(tiny_run, demo_data, tmp_path):
    """A manifest's real/fake labels give metrics (they used to be dropped silently); other names are an error."""
    manifest = pd.read_csv(demo_data / "test_manifest.csv").head(24)
    manifest["path"] = [str((demo_data / p).resolve()) for p in manifest["path"]]
    assert set(manifest["label"]) == {0, 1}
    y = manifest["label"].to_numpy()
    manifest["label"] = np.where(y == 1, "fake", "Real")  # as a manifest may spell them (case-insensitive)
    manifest.to_csv(tmp_path / "named.csv", index=False)
    res = predict(tiny_run, tmp_path / "named.csv", tmp_path / "named_preds.csv")
    preds = pd.read_csv(tmp_path / "named_preds.csv")
    assert (preds["label"].to_numpy() == y).all()
    assert 0.0 <= res["metrics"]["run"]["auc"] <= 1.0
    manifest.assign(label="cat").to_csv(tmp_path / "cats.csv", index=False)
    with pytest.raises(DataError, match=r"label values \['cat'\] are neither 0/1 nor real/fake"):
        predict(tiny_run, tmp_path / "cats.csv", tmp_path / "cats_preds.csv")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_export_onnx_matches_pytorch_and_reports_costs(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert (
        cli_main(
            [
                "export",
                str(tiny_run),
                "--format",
                "onnx",
                "--out",
                str(out),
                "--threads",
                "1",
                "export.latency_repeats=10",
                "export.validate_samples=48",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line is one JSON object
    fp32 = res["artifacts"]["fp32"]
    assert fp32["max_abs_prob_diff"] <= 1e-4 and fp32["matches_torch"]
    assert abs(fp32["auc"] - res["torch"]["auc"]) < 1e-6 and res["validation"]["n"] == 48
    assert (
        fp32["size_mb"] > 1
        and fp32["latency_ms"]["median"] > 0
        and fp32["latency_ms"]["p95"] >= fp32["latency_ms"]["median"]
    )
    assert fp32["passed"] == (fp32["latency_ms"]["median"] <= 16 and fp32["size_mb"] <= 100)
    assert json.loads((tmp_path / "m.onnx.json").read_text())["preprocessing"]["size"] == 32

    import onnxruntime as ort  # the file stands alone: uint8 images in, probabilities out

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    prob = sess.run(None, {"image": np.zeros((3, 3, 32, 32), np.uint8)})[0]
    assert prob.shape == (3,) and np.isfinite(prob).all()

    from distrib.inference.export import export_run

    ts = export_run(
        tiny_run,
        fmt="torchscript",
        out=tmp_path / "m.pt",
        overrides=["export.latency_repeats=3", "export.validate_samples=16"],
    )
    assert ts["artifacts"]["fp32"]["max_abs_prob_diff"] <= 1e-4 and ts["exporter"] == "torch.jit.trace"


def test_predict_decides_per_group_with_thresholds_fit_on_group_scores(tiny_run, demo_shards, tmp_path):
    """thresholds.group_agg=max (unit: group): every image of a group gets the group's decision, made on its max."""
    from distrib.config.downstream import ThresholdConfig
    from distrib.stacking.thresholds import fit_thresholds

    val = pd.read_csv(tiny_run / "val_predictions.csv")
    assert val["group"].nunique() < len(val)  # demo tiles: several per source photo
    th = fit_thresholds(val, ThresholdConfig(group_agg="max", bootstrap=10), tmp_path / "th")
    assert th["unit"].startswith("group (max") and th["group_agg"] == "max"
    res = predict(
        tiny_run, demo_shards, tmp_path / "test.csv", split="test", thresholds=str(tmp_path / "th" / "thresholds.json")
    )
    rule = res["decision_rule"]
    assert rule["unit"] == "group" and rule["group_agg"] == "max"
    df = pd.read_csv(tmp_path / "test.csv")
    gmax = df.groupby("group")["prob"].transform("max")
    np.testing.assert_allclose(df["score"], gmax)  # the score decided on is the group's max prob
    assert (df.groupby("group")["decision"].nunique() == 1).all()
    if rule["kind"] == "single":
        assert ((gmax >= rule["threshold"]).astype(int) == df["decision"]).all()
    groups = pd.read_csv(res["groups_csv"])
    assert "decision" in groups.columns and len(groups) == df["group"].nunique()
    assert dict(zip(groups["group"].astype(str), groups["decision"].astype(str))) == dict(
        zip(df["group"].astype(str), df["decision"].astype(str))
    )
    per_sample = predict(tiny_run, demo_shards, tmp_path / "plain.csv", split="test")  # run's own val Youden
    assert per_sample["decision_rule"].get("unit", "sample") == "sample"
    assert "decision" not in pd.read_csv(per_sample["groups_csv"]).columns
