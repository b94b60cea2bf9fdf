"""Do the stage-2 experts make different mistakes? Error overlap, disagreement, Yule's Q, McNemar's test.

Stacking only pays if the experts err on different samples. For a pair (A, B) of thresholded
experts let n11 = both correct, n10 = only A correct, n01 = only B correct, n00 = both wrong:
- disagreement rate = (n10 + n01) / n (for binary labels, predictions differ iff exactly one is right);
- Yule's Q = (n11 n00 - n10 n01) / (n11 n00 + n10 n01), in [-1, 1]; near 1 means the experts are
  right and wrong together (little to gain), near 0 or negative means complementary errors;
- McNemar's test of equal error rates uses only the discordant counts (b = n10, c = n01): the exact
  two-sided binomial p = min(1, 2 * Binom(b + c, 0.5).cdf(min(b, c))) and the continuity-corrected
  chi-square (|b - c| - 1)^2 / (b + c) with 1 degree of freedom (statsmodels is not a dependency).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from scipy.stats import binom, chi2

EXAMPLES = 10  # keys listed per "only one expert is right" example list


def contingency(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, int]:
    """Counts of (A correct, B correct) combinations."""
    y = np.asarray(y).astype(int)
    a, b = np.asarray(pred_a).astype(int) == y, np.asarray(pred_b).astype(int) == y
    return {
        "n11": int((a & b).sum()),
        "n10": int((a & ~b).sum()),
        "n01": int((~a & b).sum()),
        "n00": int((~a & ~b).sum()),
    }


def yules_q(c: dict[str, int]) -> float:
    """Yule's Q of the correctness table; NaN when it is undefined (a zero product on both sides)."""
    num = c["n11"] * c["n00"] - c["n10"] * c["n01"]
    den = c["n11"] * c["n00"] + c["n10"] * c["n01"]
    return float(num / den) if den else float("nan")


def mcnemar(c: dict[str, int]) -> dict[str, float]:
    """McNemar's test on the discordant counts: exact binomial and continuity-corrected chi-square p-values."""
    b, cc = c["n10"], c["n01"]
    n = b + cc
    if n == 0:
        return {"b": b, "c": cc, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    stat = (abs(b - cc) - 1) ** 2 / n if abs(b - cc) >= 1 else 0.0
    return {
        "b": b,
        "c": cc,
        "p_exact": float(min(1.0, 2 * binom.cdf(min(b, cc), n, 0.5))),
        "chi2": float(stat),
        "p_chi2": float(chi2.sf(stat, 1)),
    }


def pair_report(y, pred_a, pred_b, keys=None, names=("A", "B")) -> dict:
    """Everything about one pair of experts: counts, rates, Q, McNemar, accuracy where they disagree, examples."""
    c = contingency(y, pred_a, pred_b)
    n = sum(c.values())
    disagree = c["n10"] + c["n01"]
    out = {
        "experts": list(names),
        **c,
        "n": n,
        "disagreement_rate": disagree / n if n else float("nan"),
        "both_wrong_rate": c["n00"] / n if n else float("nan"),
        "yules_q": yules_q(c),
        "mcnemar": mcnemar(c),
        "accuracy_where_disagree": {
            names[0]: c["n10"] / disagree if disagree else float("nan"),
            names[1]: c["n01"] / disagree if disagree else float("nan"),
        },
    }
    if keys is not None:
        keys = np.asarray(keys)
        y = np.asarray(y).astype(int)
        a_ok, b_ok = np.asarray(pred_a).astype(int) == y, np.asarray(pred_b).astype(int) == y
        out["only_right"] = {
            names[0]: keys[a_ok & ~b_ok][:EXAMPLES].tolist(),
            names[1]: keys[~a_ok & b_ok][:EXAMPLES].tolist(),
        }
    return out


def error_overlap(y: np.ndarray, preds: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Joint error rates M[i, j] = P(i wrong and j wrong) (diagonal = error rate), and P(j wrong | i wrong)."""
    names = list(preds)
    y = np.asarray(y).astype(int)
    wrong = np.stack([np.asarray(preds[n]).astype(int) != y for n in names]).astype(float)
    joint = wrong @ wrong.T / max(len(y), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = joint / np.diag(joint)[:, None]
    return names, joint, cond


def analyse(
    y,
    probs: dict[str, np.ndarray],
    thresholds: dict[str, float],
    keys=None,
    out_dir: str | Path | None = None,
    prefix: str = "complementarity",
) -> dict:
    """Threshold each expert's probability, then report every pair and the overlap matrices (+ PNG)."""
    preds = {n: (np.asarray(p, dtype=float) >= thresholds[n]).astype(int) for n, p in probs.items()}
    names, joint, cond = error_overlap(y, preds)
    res = {
        "thresholds": {n: float(thresholds[n]) for n in names},
        "error_rate": {n: float(joint[i, i]) for i, n in enumerate(names)},
        "error_overlap": {"experts": names, "joint": joint.tolist(), "conditional": cond.tolist()},
        "pairs": [pair_report(y, preds[a], preds[b], keys, (a, b)) for a, b in itertools.combinations(names, 2)],
    }
    if out_dir is not None:
        from distrib.plots import plot_matrix

        path = plot_matrix(
            joint,
            names,
            Path(out_dir) / f"{prefix}_error_overlap.png",
            "P(row wrong and column wrong); diagonal = error rate",
        )
        res["plot"] = path.name
    return res
