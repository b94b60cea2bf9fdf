"""Binary classification metrics, all computed with scikit-learn on gathered (un-padded) predictions.

Label 1 is the positive class (manipulated / pit). Metrics that are undefined on a single-class
sample (AUC, EER) come back as NaN instead of raising, so a tiny validation split still logs.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

METRIC_NAMES = ("auc", "f1", "accuracy", "precision", "recall", "specificity", "eer", "ap")


def _as_arrays(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.shape[0]} vs {p.shape[0]}")
    return y, p


def _two_classes(y: np.ndarray) -> bool:
    return np.unique(y).size == 2


def equal_error_rate(y_true, prob) -> tuple[float, float]:
    """EER (where false-positive rate equals false-negative rate) and the threshold it occurs at.

    Interpolates linearly between the two ROC points that bracket FPR == FNR, as is usual for
    biometric/deepfake EERs, instead of reporting the nearest grid point.
    """
    y, p = _as_arrays(y_true, prob)
    if not _two_classes(y):
        return math.nan, math.nan
    fpr, tpr, thr = roc_curve(y, p)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # increasing along the curve: starts <= 0, ends >= 0
    i = int(np.argmax(diff >= 0))
    if i == 0 or diff[i] == 0:
        return float(fpr[i]), float(min(thr[i], 1.0))
    w = diff[i] / (diff[i] - diff[i - 1])  # fraction of the way back to point i-1
    eer = fpr[i] - w * (fpr[i] - fpr[i - 1])
    return float(eer), float(min(thr[i - 1] * w + thr[i] * (1 - w), 1.0))


def optimal_threshold(y_true, prob) -> float:
    """Threshold maximising Youden's J (TPR - FPR) on the given (validation / OOF) predictions."""
    y, p = _as_arrays(y_true, prob)
    if not _two_classes(y):
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    return float(min(thr[int(np.argmax(j))], 1.0))


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    """auc, f1, accuracy, precision, recall, specificity, eer, ap (average precision, sklearn) and the
    confusion matrix at ``threshold``.

    ``confusion`` is ``[[tn, fp], [fn, tp]]`` as plain ints (JSON-ready).
    """
    y, p = _as_arrays(y_true, prob)
    if y.size == 0:
        raise ValueError("binary_metrics got no samples; the validation loader yielded nothing")
    pred = (p >= threshold).astype(int)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    out = {
        "auc": float(roc_auc_score(y, p)) if _two_classes(y) else math.nan,
        "f1": float(f1_score(y, pred, zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        # specificity is the recall of the negative class
        "specificity": float(recall_score(y, pred, pos_label=0, zero_division=0)),
        "eer": equal_error_rate(y, p)[0],
        "ap": float(average_precision_score(y, p)) if _two_classes(y) else math.nan,
        "threshold": float(threshold),
        "confusion": [[tn, fp], [fn, tp]],
        "n": int(y.size),
        "positives": int(y.sum()),
    }
    return out


def metrics_at_optimal(y_true, prob) -> dict:
    """binary_metrics at the val-optimal (Youden J) threshold, for evaluation_results.json."""
    return binary_metrics(y_true, prob, optimal_threshold(y_true, prob))


def group_scores(groups, y_true, prob, agg: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One score per group (video, source photo, item): the ``agg`` ('mean' or 'max') of its samples'
    probabilities. A group is one unit per label: a video's frames share its label; a group whose
    samples carry both labels (e.g. real and manipulated crops of one photo) is scored as two units.
    Returns (unit ids 'group' or 'group|label', labels, scores)."""
    import pandas as pd

    if agg not in ("mean", "max"):
        raise ValueError(f"group aggregation must be 'mean' or 'max', got {agg!r}")
    y, p = _as_arrays(y_true, prob)
    frame = pd.DataFrame({"group": np.asarray(groups).astype(str), "label": y, "prob": p})
    g = frame.groupby(["group", "label"], sort=True)["prob"].agg(agg).reset_index()
    mixed = g["group"].duplicated(keep=False)
    ids = np.where(mixed, g["group"] + "|" + g["label"].astype(str), g["group"])
    return ids, g["label"].to_numpy().astype(int), g["prob"].to_numpy()


def group_metrics(groups, y_true, prob, agg: str) -> dict:
    """AUC, EER and AP on group scores (``group_scores``), next to the sample-level ones."""
    ids, y, p = group_scores(groups, y_true, prob, agg)
    two = _two_classes(y)
    mixed = int(sum("|" in str(i) for i in ids) // 2)
    return {
        "agg": agg,
        "n_groups": int(ids.size),
        "mixed_label_groups": mixed,
        "positives": int(y.sum()),
        "auc": float(roc_auc_score(y, p)) if two else math.nan,
        "eer": equal_error_rate(y, p)[0] if two else math.nan,
        "ap": float(average_precision_score(y, p)) if two else math.nan,
    }
