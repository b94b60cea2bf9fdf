"""Shared matplotlib helpers (Agg backend): ROC, PR, metrics-vs-threshold, heatmaps.

Every helper writes one PNG atomically (temp file + rename) and returns its path, so a report can
link it; curves come from sklearn so the plotted points are the ones the metrics were computed on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training/CI machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, precision_recall_curve, roc_curve  # noqa: E402

from distrib.atomic import save_figure  # noqa: E402


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    points: dict[str, tuple[float, float]] | None = None,
    title: str = "ROC",
) -> Path:
    """ROC curves for several scorers: ``curves[name] = (y_true, score)``; ``points`` marks (fpr, tpr)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    for name, (fx, ty) in (points or {}).items():
        ax.plot([fx], [ty], "o", label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (recall)", title=title)
    ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path)


def plot_pr(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "Precision-recall"
) -> Path:
    """Precision-recall curves for several scorers: ``curves[name] = (y_true, score)``."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, s) in curves.items():
        prec, rec, _ = precision_recall_curve(y, s)
        ax.plot(rec, prec, label=name)
        ax.axhline(float(np.mean(y)), ls=":", color="grey")
    ax.set(xlabel="recall", ylabel="precision", title=title, ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=7)
    return save_figure(fig, path)


def plot_metrics_vs_threshold(
    y: np.ndarray,
    score: np.ndarray,
    path: str | Path,
    marks: dict[str, float] | None = None,
    band: tuple[float, float] | None = None,
    title: str = "Metrics vs threshold",
) -> Path:
    """Recall, specificity, precision and F1 of ``score >= t`` over t; ``band`` is shaded, ``marks`` drawn."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    ts = np.unique(np.quantile(score, np.linspace(0, 1, 201)))
    pos = y == 1
    P, N = max(pos.sum(), 1), max((~pos).sum(), 1)
    pred = score[None, :] >= ts[:, None]
    tp = (pred & pos).sum(1)
    fp = (pred & ~pos).sum(1)
    recall, spec = tp / P, 1 - fp / N
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in (("recall", recall), ("specificity", spec), ("precision", precision), ("F1", f1)):
        ax.plot(ts, v, label=name)
    if band is not None:
        ax.axvspan(band[0], band[1], color="orange", alpha=0.2, label="uncertain band")
    for name, t in (marks or {}).items():
        ax.axvline(t, ls="--", lw=0.8, color="k")
        ax.text(t, 0.02, name, rotation=90, fontsize=7, va="bottom")
    ax.set(xlabel="threshold t (positive if score >= t)", ylabel="metric", title=title, ylim=(0, 1.02))
    ax.legend(loc="center left", fontsize=7)
    return save_figure(fig, path)


def plot_matrix(
    matrix: np.ndarray,
    labels: Sequence[str],
    path: str | Path,
    title: str,
    col_labels: Sequence[str] | None = None,
    fmt: str = "{:.2f}",
) -> Path:
    """Annotated heatmap (error-overlap matrices, confusion matrices)."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * m.shape[1], 1.0 + 0.9 * m.shape[0]))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(m.shape[1]), list(col_labels or labels), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(m.shape[0]), list(labels), fontsize=8)
    hi = np.nanmax(m) if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                fmt.format(m[i, j]),
                ha="center",
                va="center",
                color="white" if m[i, j] > 0.6 * hi else "black",
                fontsize=8,
            )
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_bars(
    values: dict[str, float], path: str | Path, title: str, ylabel: str, errors: Iterable[float] | None = None
) -> Path:
    """Bar chart with optional error bars (ablation AUCs, cost per image)."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(values), 3.5))
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], yerr=None if errors is None else list(errors), capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    return save_figure(fig, path)
