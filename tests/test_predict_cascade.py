"""`distrib predict` with a cascade YAML on the test shards gives `distrib cascade --split test`'s scores."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from distrib.cli import main as cli_main
from distrib.config import load_config

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
SMALL = [
    "embed.dim=8",
    "embed.anchors=24",
    "embed.fit_samples=64",
    "embed.batch_size=16",
    "stack.folds=2",
    "stack.n_estimators=20",
    "thresholds.bootstrap=10",
]


@pytest.fixture(scope="module")
def cascade_yaml(fold_runs, tmp_path_factory):
    """The smallest real cascade: 3 fold runs form the expert, fold 0 doubles as stage 1, a 1-expert stack."""
    from distrib.stacking.embed import extract_oof
    from distrib.stacking.stack import fit_stack

    root = tmp_path_factory.mktemp("cascade")
    runs = fold_runs
    cfg = load_config(DEBUG, SMALL)
    oof = root / "oof_embeddings.parquet"
    extract_oof(runs, oof, cfg.embed)
    fit_stack([oof], root / "stack", cfg.stack)
    path = root / "cascade.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "batch_size": 16,
                "device": "cpu",
                "recall": 0.9,
                "specificity": 0.5,
                "bootstrap": 10,
                "group_agg": "max",
                "stage1": {"run": runs[0]},
                "stack": {"dir": str(root / "stack")},
            }
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_on_test_shards_equals_distrib_cascade(cascade_yaml, demo_shards, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="distrib")
    assert cli_main(["cascade", "--config", str(cascade_yaml), "--split", "test", "--out", str(tmp_path / "c")]) == 0
    fitting = "thresholds: ignoring"  # the fit says which test rows it left out...
    assert fitting in caplog.text
    caplog.clear()
    ref = pd.read_csv(tmp_path / "c" / "cascade_predictions.csv")
    out = tmp_path / "p" / "preds.csv"
    assert (
        cli_main(
            [
                "predict",
                "--model",
                str(cascade_yaml),
                "--images",
                str(demo_shards),
                "--split",
                "test",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert fitting not in caplog.text  # ...predict repeats that fit silently (it read as if predict fit on test)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    preds = pd.read_csv(out)
    m = ref.merge(preds, left_on="key", right_on="path", validate="one_to_one")
    assert len(m) == len(ref) == len(preds) == res["n"]
    assert np.abs(m["stage1_prob_x"] - m["stage1_prob_y"]).max() < 1e-6
    esc = m["escalated"].to_numpy().astype(bool)
    assert esc.any() and ((m["route"] == "escalated").to_numpy() == esc).all()
    assert np.abs(m.loc[esc, "meta_prob_escalated"] - m.loc[esc, "meta_prob_y"]).max() < 1e-6
    assert m.loc[~esc, "meta_prob_y"].isna().all()  # stages 2+3 ran on the escalated rows only
    expert = [c for c in preds.columns if c.startswith("prob_")]
    assert len(expert) == 1 and np.abs(m.loc[esc, f"{expert[0]}_x"] - m.loc[esc, f"{expert[0]}_y"]).max() < 1e-6
    assert np.abs(m["cascade_score"] - m["score"]).max() < 1e-6
    assert (m["final_decision"] == m["decision"]).all()
    evaluation = json.loads((tmp_path / "c" / "evaluation_results.json").read_text())
    assert res["metrics"]["cascade"]["auc"] == pytest.approx(evaluation["metrics"]["cascade"]["auc"], abs=1e-6)
    # group_agg: max -> each (source photo, label) unit scored by its most suspicious crop, next to sample level
    from sklearn.metrics import roc_auc_score

    units = ref.groupby(["group", "label"])
    group = evaluation["group_metrics"]["cascade"]
    assert group["agg"] == "max" and group["n_groups"] == units.ngroups
    assert group["auc"] == pytest.approx(roc_auc_score(units["label"].first(), units["cascade_score"].max()), abs=1e-9)
    assert "Group level (each group scored by the max" in (tmp_path / "c" / "report.md").read_text()
