"""Decision thresholds fit on OOF/val predictions (never test): F1, Youden, recall-constrained, 3-way band.

    distrib thresholds --pred runs/stack/meta_predictions.parquet --out runs/thresholds thresholds.recall=0.99

Conventions: a sample is predicted positive when ``score >= t``. The 3-way band ``(t_low, t_high)``
decides ``score < t_low`` -> negative, ``score >= t_high`` -> positive, and routes the rest
(``t_low <= score < t_high``) to "uncertain" (the next cascade stage or manual review). The band's
constraints hold on the automatically decided samples: recall = TP / (TP + FN) and specificity =
TN / (TN + FP) counted only over rows outside the band. This is the stricter reading: if the
uncertain rows are resolved correctly, end-to-end recall and specificity can only be higher.
Unmet constraints are reported as ``feasible: false`` with a sentence, never silently violated.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from distrib.atomic import json_safe, write_json
from distrib.config import ThresholdConfig
from distrib.errors import DataError, DistribError
from distrib.metrics import group_scores

log = logging.getLogger(__name__)

_EPS = 1e-12


def load_predictions(path: str | Path) -> pd.DataFrame:
    """Read a predictions CSV/parquet with at least ``label`` and ``prob`` (``group``, ``split`` optional)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"predictions file not found: {path} (pass --pred meta_predictions.parquet or val_predictions.csv)"
        )
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in ("label", "prob") if c not in df.columns]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing}; a predictions file needs label and prob "
            f"(columns present: {list(df.columns)[:12]})"
        )
    bad = ~df["label"].isin([0, 1])
    if bad.any():
        raise DataError(f"{path}: label must be 0/1, found {sorted(df.loc[bad, 'label'].unique().tolist())[:5]}")
    if df["prob"].isna().any():
        raise DataError(f"{path}: {int(df['prob'].isna().sum())} rows have no prob; re-run the step that wrote it")
    out = (df["prob"] < 0) | (df["prob"] > 1)
    if out.any():
        hint = " (a 0-100 percentage? divide by 100)" if df["prob"].max() <= 100 and df["prob"].min() >= 0 else ""
        raise DataError(
            f"{path}: prob must be a probability in 0..1, but {int(out.sum())} rows are outside it "
            f"(min {df['prob'].min():g}, max {df['prob'].max():g}){hint}; fix the column and re-run"
        )
    return df


def _check_fit_rows(df: pd.DataFrame) -> None:
    if "split" in df.columns and (df["split"] == "test").any():
        raise DistribError(
            f"refusing to fit thresholds on {int((df['split'] == 'test').sum())} rows with "
            "split == 'test': thresholds are fit on OOF or val predictions only; "
            "select those rows (thresholds.fit_split=oof or val)"
        )
    y = df["label"].to_numpy()
    if (y == 1).sum() == 0 or (y == 0).sum() == 0:
        raise DataError(
            f"threshold fitting needs both classes; got {int((y == 1).sum())} positives and "
            f"{int((y == 0).sum())} negatives"
        )


def rates(y: np.ndarray, score: np.ndarray, t_low: float, t_high: float) -> dict:
    """Counts and rates of the rule (score < t_low -> 0, score >= t_high -> 1, else uncertain); sklearn counts."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    auto = (score < t_low) | (score >= t_high)
    pred = (score >= t_high).astype(int)
    tn, fp, fn, tp = confusion_matrix(y[auto], pred[auto], labels=[0, 1]).ravel() if auto.any() else (0, 0, 0, 0)
    return {
        "recall": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "precision": float(tp / (tp + fp)) if tp + fp else float("nan"),
        "uncertain_fraction": float(1 - auto.mean()),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def threshold_f1(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold that maximises F1 (sklearn's precision-recall curve)."""
    prec, rec, thr = precision_recall_curve(y, score)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], _EPS)
    return float(thr[int(np.argmax(f1))])


def threshold_youden(y: np.ndarray, score: np.ndarray) -> float:
    """The threshold that maximises Youden's J = recall + specificity - 1 (sklearn's ROC curve)."""
    fpr, tpr, thr = roc_curve(y, score, drop_intermediate=False)
    k = int(np.argmax(tpr[1:] - fpr[1:])) + 1  # index 0 is sklearn's +inf "predict nothing" point
    return float(thr[k])


def threshold_max_specificity(y: np.ndarray, score: np.ndarray, recall: float) -> float:
    """The highest threshold (so the highest specificity) whose recall on (y, score) is >= ``recall``."""
    fpr, tpr, thr = roc_curve(y, score, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= recall - _EPS)
    ok = ok[ok > 0]  # index 0 (+inf) predicts no positive
    return float(thr[ok[0]])  # tpr reaches 1 at the lowest score, so ok is never empty


def _best_achievable(y: np.ndarray, score: np.ndarray, recall: float, specificity: float) -> dict:
    """The best pair one threshold reaches: max specificity at the recall asked, max recall at the
    specificity asked (sklearn's ROC curve; None when one class is missing)."""
    if len(np.unique(y)) < 2:
        return {"specificity_at_recall": None, "recall_at_specificity": None}
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    spec = 1 - fpr
    at_recall = spec[tpr >= recall - _EPS]
    at_spec = tpr[spec >= specificity - _EPS]
    return {
        "specificity_at_recall": float(at_recall.max()) if at_recall.size else None,
        "recall_at_specificity": float(at_spec.max()) if at_spec.size else None,
    }


def fit_band(y: np.ndarray, score: np.ndarray, recall: float, specificity: float) -> dict:
    """The band (t_low, t_high) with the fewest uncertain rows whose auto-decisions meet both constraints.

    Candidates are the unique scores (plus one just above the maximum). For each t_low the best
    t_high is the lowest one meeting the specificity constraint (FP only grows as t_high drops);
    recall is then checked there, where it is highest. O(n log n) instead of all pairs.
    """
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    u = np.unique(score)
    cand = np.append(u, np.nextafter(u[-1], np.inf))  # cand[k]: rows with score < cand[k] are "below"
    idx = np.searchsorted(u, score)  # row's position among unique scores
    pos_below = np.concatenate([[0], np.cumsum(np.bincount(idx, weights=y, minlength=len(u)))])
    all_below = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=len(u)))])
    neg_below = all_below - pos_below
    P, N = pos_below[-1], neg_below[-1]
    best = None
    for i in range(len(cand)):
        fn, tn = pos_below[i], neg_below[i]
        # lowest j >= i with FP(j) = N - neg_below[j] satisfying TN / (TN + FP) >= S
        fp_max = tn * (1 - specificity) / specificity if specificity > 0 else np.inf
        j = max(i, int(np.searchsorted(neg_below, N - fp_max - 1e-9, side="left")))
        if j >= len(cand):
            continue
        tp, fp = P - pos_below[j], N - neg_below[j]
        # a rate over no rows is not a rate: a band that decides no positive (or no negative) has no
        # recall (or specificity) to meet the constraint with, so it is not counted as meeting it
        if tp + fn == 0 or tn + fp == 0 or tp < recall * (tp + fn) - 1e-9:
            continue
        decided = (fn + tn) + (tp + fp)
        if decided == 0:
            continue
        bal = (tp / (tp + fn) if tp + fn else 1.0) + (tn / (tn + fp) if tn + fp else 1.0)
        key = (-decided, -bal, i)
        if best is None or key < best[0]:
            best = (key, i, j)
    n = len(score)
    if best is None:
        achievable = _best_achievable(y, score, recall, specificity)
        return {
            "feasible": False,
            "t_low": None,
            "t_high": None,
            "uncertain_fraction": 1.0,
            "best_achievable": achievable,
            "message": (
                f"no band meets recall >= {recall} and specificity >= {specificity} on its "
                f"auto-decided rows (each class decided at least once) among the {n} rows; all rows would "
                f"have to go to the next stage. Best achievable with one threshold: specificity "
                f"{_fmt(achievable['specificity_at_recall'])} at recall >= {recall}, recall "
                f"{_fmt(achievable['recall_at_specificity'])} at specificity >= {specificity}"
            ),
        }
    _, i, j = best
    t_low, t_high = float(cand[i]), float(cand[j])
    out = {"feasible": True, "t_low": t_low, "t_high": t_high, **rates(y, score, t_low, t_high)}
    out["message"] = (
        f"band [{t_low:.4g}, {t_high:.4g}) routes {out['uncertain_fraction']:.1%} of rows to the next "
        f"stage; auto-decided recall {_fmt(out['recall'])} >= {recall}, "
        f"specificity {_fmt(out['specificity'])} >= {specificity}"
    )
    return out


def group_resamples(groups: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row -> group index [N], B x G counts of each group in each resample drawn with replacement)."""
    gid, uniq = pd.factorize(pd.Series(groups).astype(str))
    G = len(uniq)
    rng = np.random.default_rng(seed)
    return gid, rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot)


def weighted_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row of sample ``weights`` [B, N] at once (ties count 1/2, as sklearn's).

    Equal to ``roc_auc_score(y, score, sample_weight=weights[b])`` for every b; vectorized because a
    bootstrap or a greedy ensemble search needs thousands of them. NaN where a class has no weight.
    """
    y = np.asarray(y).astype(bool)
    order = np.argsort(np.asarray(score, dtype=float), kind="stable")
    s = np.asarray(score, dtype=float)[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each distinct score
    W = np.atleast_2d(np.asarray(weights, dtype=float))[:, order]
    pos = np.add.reduceat(W * y[order], starts, axis=1)
    neg = np.add.reduceat(W * ~y[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each distinct score
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def auc_difference(
    y: np.ndarray, score: np.ndarray, baseline: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> dict:
    """AUC(score) - AUC(baseline) on the same rows (sklearn), with a grouped-bootstrap 95% CI of it.

    Whole groups are resampled with replacement (``group_resamples``, shared with ``grouped_bootstrap``);
    each resample scores both models on the same rows, so the CI is of the paired difference.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    a, b = float(roc_auc_score(y, score)), float(roc_auc_score(y, baseline))
    ci = None
    if n_boot:
        gid, counts = group_resamples(groups, n_boot, seed)
        rw = counts[:, gid]  # B x N row weights
        ci = _ci(weighted_auc(y, score, rw) - weighted_auc(y, baseline, rw))
    return {
        "auc": a,
        "baseline_auc": b,
        "diff": a - b,
        "diff_ci95": ci,
        "bootstrap": int(n_boot),
        "groups": int(len(pd.unique(pd.Series(np.asarray(groups)).astype(str)))),
    }


def grouped_bootstrap(
    y: np.ndarray, score: np.ndarray, groups: np.ndarray, rules: dict[str, tuple[float, float]], n_boot: int, seed: int
) -> dict:
    """95% CIs of recall and specificity per rule, resampling whole groups with replacement."""
    if n_boot == 0:
        return {}
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    gid, weights = group_resamples(groups, n_boot, seed)
    G = weights.shape[1]
    out = {}
    for name, (lo, hi) in rules.items():
        neg_pred, pos_pred = score < lo, score >= hi
        per_group = np.stack(
            [
                np.bincount(gid, weights=(y == 1) & pos_pred, minlength=G),
                np.bincount(gid, weights=(y == 1) & neg_pred, minlength=G),
                np.bincount(gid, weights=(y == 0) & neg_pred, minlength=G),
                np.bincount(gid, weights=(y == 0) & pos_pred, minlength=G),
            ],
            axis=1,
        )
        tp, fn, tn, fp = (weights @ per_group).T
        with np.errstate(invalid="ignore", divide="ignore"):
            rec, spec = tp / (tp + fn), tn / (tn + fp)
        out[name] = {"recall_ci95": _ci(rec), "specificity_ci95": _ci(spec)}
    return out


def _fmt(v: float | None) -> str:
    return "n/a (none auto-decided)" if v is None or not np.isfinite(v) else f"{v:.4f}"


def _ci(values: np.ndarray) -> list[float] | None:
    v = values[np.isfinite(values)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None


def fit_thresholds(df: pd.DataFrame, cfg: ThresholdConfig, out_dir: str | Path, name: str = "") -> dict:
    """Fit every threshold on ``df`` (OOF/val rows only), write thresholds.json and plots, return the dict."""
    from distrib.plots import plot_metrics_vs_threshold, plot_pr, plot_roc

    _check_fit_rows(df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y, s = df["label"].to_numpy().astype(int), df["prob"].to_numpy(dtype=float)
    groups = df["group"].to_numpy() if "group" in df.columns else np.arange(len(df))
    unit = "sample"
    if cfg.group_agg != "none":  # one score per group (video, item): decisions are then made per group
        if "group" not in df.columns:
            raise DataError(
                f"thresholds.group_agg={cfg.group_agg} needs a 'group' column in the predictions; "
                "add one or set thresholds.group_agg=none"
            )
        groups, y, s = group_scores(groups, y, s, cfg.group_agg)
        unit = f"group ({cfg.group_agg} of its samples' probabilities)"
    t_f1, t_j = threshold_f1(y, s), threshold_youden(y, s)
    t_r = threshold_max_specificity(y, s, cfg.recall)
    single = {
        "f1": {"threshold": t_f1, **rates(y, s, t_f1, t_f1)},
        "youden": {"threshold": t_j, **rates(y, s, t_j, t_j)},
        "max_specificity_at_recall": {"threshold": t_r, "recall_target": cfg.recall, **rates(y, s, t_r, t_r)},
    }
    con = single["max_specificity_at_recall"]
    con["feasible"] = bool(con["recall"] >= cfg.recall - _EPS)
    con["message"] = (
        f"t = {t_r:.4g} keeps recall {con['recall']:.4f} >= {cfg.recall} with specificity {con['specificity']:.4f}"
    )
    if con["specificity"] < cfg.specificity:
        con["message"] += (
            f"; a single threshold cannot also reach specificity >= {cfg.specificity} (use the 3-way band)"
        )
    band = fit_band(y, s, cfg.recall, cfg.specificity)
    band.update(recall_target=cfg.recall, specificity_target=cfg.specificity)
    rules = {k: (v["threshold"], v["threshold"]) for k, v in single.items()}
    if band["feasible"]:
        rules["band"] = (band["t_low"], band["t_high"])
    ci = grouped_bootstrap(y, s, groups, rules, cfg.bootstrap, cfg.seed)
    for k, v in ci.items():
        (band if k == "band" else single[k]).update(v)
    prefix = f"{name}_" if name else ""
    plots = {
        "roc": plot_roc(
            {name or "score": (y, s)},
            out / f"{prefix}roc.png",
            points={k: (1 - v["specificity"], v["recall"]) for k, v in single.items()},
        ),
        "pr": plot_pr({name or "score": (y, s)}, out / f"{prefix}pr.png"),
        "metrics_vs_threshold": plot_metrics_vs_threshold(
            y,
            s,
            out / f"{prefix}metrics_vs_threshold.png",
            marks={k: v["threshold"] for k, v in single.items()},
            band=(band["t_low"], band["t_high"]) if band["feasible"] else None,
        ),
    }
    result = {
        "unit": unit,
        "group_agg": cfg.group_agg,
        "n": int(len(y)),
        "positives": int(y.sum()),
        "groups": int(len(pd.unique(groups))),
        "splits_used": sorted(df["split"].unique().tolist()) if "split" in df.columns else ["(no split column)"],
        "bootstrap": cfg.bootstrap,
        "single": single,
        "band": band,
        "plots": {k: str(Path(p).name) for k, p in plots.items()},
    }
    path = out / f"{prefix}thresholds.json"
    result = json_safe(result)
    write_json(path, result)
    return result


def select_fit_rows(
    df: pd.DataFrame, fit_split: str, source: str = "predictions", log_test_rows: bool = True
) -> pd.DataFrame:
    """Rows of ``fit_split`` ('oof', 'val' or 'oof+val'); test rows are dropped and counted, never used.

    ``log_test_rows=False``: no log line about them (``predict`` re-derives a cascade's fitted thresholds)."""
    if "split" not in df.columns:
        return df
    n_test = int((df["split"] == "test").sum())
    if n_test and log_test_rows:
        log.info(f"thresholds: ignoring {n_test} test rows of {source} (thresholds are never fit on test)")
    want = fit_split.split("+")
    sel = df[df["split"].isin(want)]
    if sel.empty:
        raise DataError(
            f"{source} has no rows with split in {want} (splits present: "
            f"{sorted(df['split'].unique().tolist())}); set thresholds.fit_split accordingly"
        )
    return sel


def decide(score: np.ndarray, t_low: float, t_high: float) -> np.ndarray:
    """Apply a band: 0 (auto-negative), 1 (auto-positive) or -1 (uncertain, route onward)."""
    score = np.asarray(score, dtype=float)
    return np.where(score < t_low, 0, np.where(score >= t_high, 1, -1))
