"""Group-level metrics: each group scored from its samples (mean or max), AUC/EER/AP by sklearn."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from distrib.metrics import binary_metrics, group_metrics, group_scores


@pytest.mark.parametrize("agg", ["mean", "max"])
def test_group_metrics_score_each_group_once(agg):
    rng = np.random.default_rng(0)
    groups = np.repeat([f"v{i}" for i in range(30)], 5)  # 30 videos x 5 frames
    y = np.repeat(rng.integers(0, 2, 30), 5)
    prob = np.clip(0.3 * y + rng.uniform(0, 0.7, y.size), 0, 1)
    frame = pd.DataFrame({"g": groups, "y": y, "p": prob}).groupby("g")
    want_p, want_y = frame["p"].agg(agg), frame["y"].max()
    ids, gy, gp = group_scores(groups, y, prob, agg)
    assert list(ids) == list(want_p.index) and np.array_equal(gy, want_y.to_numpy()) and np.allclose(gp, want_p)
    m = group_metrics(groups, y, prob, agg)
    assert m["n_groups"] == 30 and m["positives"] == int(want_y.sum())
    assert m["auc"] == pytest.approx(roc_auc_score(want_y, want_p))
    assert m["ap"] == pytest.approx(average_precision_score(want_y, want_p))
    assert 0.0 <= m["eer"] <= 1.0


def test_a_group_with_both_labels_is_two_units():
    ids, y, p = group_scores(["a", "a", "a", "b"], [0, 1, 1, 0], [0.2, 0.6, 0.9, 0.1], "max")
    assert list(ids) == ["a|0", "a|1", "b"] and list(y) == [0, 1, 0] and list(p) == [0.2, 0.9, 0.1]
    assert group_metrics(["a", "a", "a", "b"], [0, 1, 1, 0], [0.2, 0.6, 0.9, 0.1], "max")["mixed_label_groups"] == 1


def test_ap_in_every_binary_metric_table_and_nan_on_one_class():
    y, p = np.array([0, 1, 1, 0, 1]), np.array([0.1, 0.8, 0.4, 0.5, 0.9])
    assert binary_metrics(y, p)["ap"] == pytest.approx(average_precision_score(y, p))
    assert math.isnan(binary_metrics(np.ones(3), np.array([0.2, 0.5, 0.9]))["ap"])
    assert math.isnan(group_metrics(["a", "a", "b"], [1, 1, 1], [0.1, 0.2, 0.3], "mean")["auc"])
    with pytest.raises(ValueError, match="mean' or 'max"):
        group_scores(["a"], [1], [0.5], "median")
