"""Complementarity statistics on hand-computed small examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distrib.cascade.complementarity import analyse, contingency, mcnemar, pair_report, yules_q

# 10 samples, all positive: A right on 0-7, B right on 0-4 and 8 -> n11=5, n10=3, n01=1, n00=1.
Y = np.ones(10, dtype=int)
A = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
B = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0])
KEYS = np.array([f"k{i}" for i in range(10)])


def test_counts_q_and_mcnemar_match_hand_computation():
    c = contingency(Y, A, B)
    assert c == {"n11": 5, "n10": 3, "n01": 1, "n00": 1}
    assert yules_q(c) == pytest.approx((5 * 1 - 3 * 1) / (5 * 1 + 3 * 1))  # 0.25
    m = mcnemar(c)
    # exact: 2 * P(X <= 1 | n=4, p=.5) = 2 * (1 + 4) / 16
    assert m["p_exact"] == pytest.approx(10 / 16)
    # chi2 with continuity correction: (|3 - 1| - 1)^2 / 4 = 0.25; sf(0.25, 1) = 2 * (1 - Phi(0.5))
    assert m["chi2"] == pytest.approx(0.25)
    assert m["p_chi2"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))))


def test_pair_report_disagreement_accuracy_and_examples():
    r = pair_report(Y, A, B, KEYS, ("cnn", "gen"))
    assert r["disagreement_rate"] == pytest.approx(0.4)
    assert r["accuracy_where_disagree"] == {"cnn": 0.75, "gen": 0.25}
    assert r["only_right"] == {"cnn": ["k5", "k6", "k7"], "gen": ["k8"]}
    assert r["both_wrong_rate"] == pytest.approx(0.1)


def test_extremes_of_q_and_mcnemar():
    same = contingency(Y, A, A)  # identical experts: right and wrong together
    assert same == {"n11": 8, "n10": 0, "n01": 0, "n00": 2} and yules_q(same) == 1.0
    assert mcnemar(same)["p_exact"] == 1.0 and mcnemar(same)["p_chi2"] == 1.0
    y = np.array([0, 1, 0, 1])  # perfectly complementary: each sample right for exactly one expert
    a = np.array([0, 1, 1, 0])  # right on samples 0-1, the other expert on 2-3
    assert contingency(y, a, 1 - a) == {"n11": 0, "n10": 2, "n01": 2, "n00": 0}
    assert yules_q(contingency(y, a, 1 - a)) == -1.0
    assert math.isnan(yules_q({"n11": 3, "n10": 0, "n01": 2, "n00": 0}))  # undefined: zero products
    # 10 discordant pairs all one way: exact p = 2 / 2^10
    assert mcnemar({"n11": 0, "n10": 10, "n01": 0, "n00": 0})["p_exact"] == pytest.approx(2 / 1024)


def test_error_overlap_matrix_and_plot(tmp_path):
    res = analyse(Y, {"cnn": A * 0.9, "gen": B * 0.8}, {"cnn": 0.5, "gen": 0.5}, KEYS, out_dir=tmp_path)
    joint = np.array(res["error_overlap"]["joint"])
    np.testing.assert_allclose(joint, [[0.2, 0.1], [0.1, 0.4]])
    np.testing.assert_allclose(res["error_overlap"]["conditional"], [[1.0, 0.5], [0.25, 1.0]])
    assert res["pairs"][0]["yules_q"] == pytest.approx(0.25)
    assert (tmp_path / res["plot"]).stat().st_size > 1000
