"""Thresholds: constrained threshold meets recall on its fit data, exact band on hand-built scores, test rows refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import recall_score

from distrib.cli import main as cli_main
from distrib.config import ThresholdConfig
from distrib.errors import DistribError
from distrib.stacking.thresholds import (
    decide,
    fit_band,
    fit_thresholds,
    grouped_bootstrap,
    rates,
    select_fit_rows,
    threshold_max_specificity,
)

# Hand-built: negatives at 0.1..0.4 and 0.6, positives at 0.5 and 0.7..0.95.
NEG = [0.1, 0.2, 0.3, 0.4, 0.6]
POS = [0.5, 0.7, 0.8, 0.9, 0.95]
Y = np.array([0] * 5 + [1] * 5)
S = np.array(NEG + POS)


def _overlap(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 2.0 * y - 1.0)))
    return pd.DataFrame({"label": y, "prob": s, "group": [f"g{i // 4}" for i in range(n)], "split": "oof"})


def test_band_exact_on_hand_built_scores():
    band = fit_band(Y, S, recall=1.0, specificity=1.0)
    # No error allowed: negatives strictly below the lowest positive (0.5), positives from 0.7 up.
    assert band["feasible"] and band["t_low"] == 0.5 and band["t_high"] == 0.7
    assert band["uncertain_fraction"] == pytest.approx(0.2)
    assert (band["tp"], band["fn"], band["tn"], band["fp"]) == (4, 0, 4, 0)
    np.testing.assert_array_equal(decide(S, band["t_low"], band["t_high"]), [0, 0, 0, 0, -1, -1, 1, 1, 1, 1])


def test_band_collapses_to_single_threshold_when_constraints_allow():
    band = fit_band(Y, S, recall=0.9, specificity=0.8)
    # t = 0.5 decides every row: recall 5/5, specificity 4/5 = 0.8; t = 0.7 would drop recall to 0.8.
    assert band["feasible"] and band["t_low"] == band["t_high"] == 0.5
    assert band["uncertain_fraction"] == 0.0
    assert band["recall"] == 1.0 and band["specificity"] == pytest.approx(0.8)


def test_band_infeasible_is_reported_not_violated():
    # Lowest score is a positive and highest a negative: any auto-decision makes an error.
    y = np.array([1, 0, 1, 0, 1, 0])
    s = np.array([0.0, 0.3, 0.4, 0.5, 0.6, 1.0])
    band = fit_band(y, s, recall=1.0, specificity=1.0)
    assert band["feasible"] is False and band["t_low"] is None
    assert "no band meets recall >= 1.0" in band["message"]


def test_band_meets_constraints_on_random_scores():
    df = _overlap(n=150)
    y, s = df["label"].to_numpy(), df["prob"].to_numpy()
    band = fit_band(y, s, recall=0.99, specificity=0.95)
    assert band["feasible"]
    r = rates(y, s, band["t_low"], band["t_high"])
    assert r["recall"] >= 0.99 and r["specificity"] >= 0.95
    # Minimality against brute force over all candidate pairs (numpy, every lo <= hi).
    cand = np.append(np.unique(s), np.inf)
    lo, hi = np.meshgrid(cand, cand, indexing="ij")
    neg, pos = s[None, None, :] < lo[..., None], s[None, None, :] >= hi[..., None]
    tp, fn = (pos & (y == 1)).sum(-1), (neg & (y == 1)).sum(-1)
    tn, fp = (neg & (y == 0)).sum(-1), (pos & (y == 0)).sum(-1)
    ok = (lo <= hi) & (tp + fn + tn + fp > 0) & (tp >= 0.99 * (tp + fn) - 1e-9) & (tn >= 0.95 * (tn + fp) - 1e-9)
    best = 1 - (tp + fn + tn + fp)[ok].max() / len(s)
    assert band["uncertain_fraction"] == pytest.approx(best)


def test_constrained_threshold_meets_recall_and_is_maximal():
    df = _overlap()
    y, s = df["label"].to_numpy(), df["prob"].to_numpy()
    t = threshold_max_specificity(y, s, 0.99)
    assert recall_score(y, (s >= t).astype(int)) >= 0.99
    higher = np.unique(s)[np.unique(s) > t]
    assert recall_score(y, (s >= higher[0]).astype(int)) < 0.99  # one step higher breaks the constraint


def test_fit_thresholds_writes_json_plots_and_ci(tmp_path):
    df = _overlap()
    cfg = ThresholdConfig(bootstrap=200, recall=0.99, specificity=0.95)
    res = fit_thresholds(df, cfg, tmp_path)
    saved = json.loads((tmp_path / "thresholds.json").read_text())
    assert saved["single"]["max_specificity_at_recall"]["recall"] >= 0.99
    assert saved["single"]["max_specificity_at_recall"]["feasible"] is True
    for key in ("roc", "pr", "metrics_vs_threshold"):
        assert (tmp_path / res["plots"][key]).stat().st_size > 1000
    lo, hi = saved["single"]["youden"]["recall_ci95"]
    assert lo <= saved["single"]["youden"]["recall"] <= hi and hi - lo > 0
    assert saved["groups"] == 100


def test_grouped_bootstrap_resamples_whole_groups():
    # One group holds every positive that the rule misses: the CI must be able to reach recall 1.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2])
    g = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    ci = grouped_bootstrap(y, s, g, {"t": (0.5, 0.5)}, n_boot=500, seed=0)["t"]
    assert ci["recall_ci95"][0] == 0.0 and ci["recall_ci95"][1] == 1.0  # only 0, 0.5 or 1 are possible
    assert ci["specificity_ci95"] == [1.0, 1.0]


def test_test_rows_are_refused(tmp_path):
    df = _overlap()
    df.loc[:9, "split"] = "test"
    with pytest.raises(DistribError, match="split == 'test'"):
        fit_thresholds(df, ThresholdConfig(bootstrap=0), tmp_path)
    kept = select_fit_rows(df, "oof")
    assert len(kept) == len(df) - 10 and not (kept["split"] == "test").any()
    with pytest.raises(DistribError, match="no rows with split in \\['val'\\]"):
        select_fit_rows(df, "val")


def test_cli_prints_infeasible(tmp_path, capsys):
    pred = tmp_path / "pred.csv"
    pd.DataFrame({"label": [1, 0, 1, 0, 1, 0], "prob": [0.0, 0.3, 0.4, 0.5, 0.6, 1.0], "group": list("abcdef")}).to_csv(
        pred, index=False
    )
    assert (
        cli_main(
            [
                "thresholds",
                "--pred",
                str(pred),
                "--out",
                str(tmp_path / "out"),
                "thresholds.recall=1.0",
                "thresholds.specificity=1.0",
                "thresholds.bootstrap=20",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["band"]["feasible"] is False
    assert "INFEASIBLE" in out


def test_thresholds_fit_on_group_scores(tmp_path):
    """thresholds.group_agg=max: one unit per (group, label), scored by its most suspicious sample; the
    constrained threshold then keeps group-level recall, which a sample-level fit does not promise."""
    df = _overlap(n=400)  # 4 samples per group, labels mixed inside groups -> up to 2 units per group
    cfg = ThresholdConfig(bootstrap=50, recall=0.99, specificity=0.95, group_agg="max")
    res = fit_thresholds(df, cfg, tmp_path)
    units = df.groupby(["group", "label"])["prob"].max().reset_index()
    assert res["unit"].startswith("group (max") and res["n"] == len(units)
    assert res["positives"] == int(units["label"].sum())
    t = res["single"]["max_specificity_at_recall"]["threshold"]
    assert recall_score(units["label"], (units["prob"] >= t).astype(int)) >= 0.99
    assert fit_thresholds(df, ThresholdConfig(bootstrap=0), tmp_path / "s")["unit"] == "sample"
    with pytest.raises(DistribError, match="needs a 'group' column"):
        fit_thresholds(df.drop(columns=["group"]), cfg, tmp_path / "x")


def test_impossible_constraints_are_infeasible_with_the_best_achievable_pair():
    # overlapping scores: no band decides both classes with recall 1.0 and specificity 1.0. A band that
    # decides only negatives has no recall at all; it used to count as recall >= 1.0 and "feasible".
    # the lowest score is a positive and the highest a negative, so every band errs on what it decides
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    score = 0.5 * y + rng.normal(0.25, 0.2, 2000)
    y[np.argmin(score)], y[np.argmax(score)] = 1, 0
    band = fit_band(y, score, recall=1.0, specificity=1.0)
    assert band["feasible"] is False and band["t_low"] is None
    pair = band["best_achievable"]
    assert pair == {"specificity_at_recall": 0.0, "recall_at_specificity": 0.0}  # the planted extremes
    assert "Best achievable" in band["message"]
    # a reachable pair stays feasible, and both of its rates are real numbers that meet the constraints
    ok = fit_band(y, score, recall=0.9, specificity=0.9)
    assert ok["feasible"] and ok["recall"] >= 0.9 and ok["specificity"] >= 0.9
