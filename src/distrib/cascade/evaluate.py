"""Cascade evaluation: per-stage and cascade metrics, escalation and cost, complementarity, plots, report.

Split from ``cascade.py`` so the streaming loop stays short; everything here works on the
per-sample table the loop wrote (``cascade_predictions.csv``), so it can be re-run offline.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.atomic import json_safe, write_json
from distrib.metrics import binary_metrics, group_metrics


def _stats(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(np.mean(v)), float(np.percentile(v, 95))


def _copy_figures(out: Path, runs: dict, stack_dir: str) -> dict[str, str]:
    """Copy the training curves, reconstruction samples and stack ablation next to the report."""
    fig = out / "figures"
    fig.mkdir(exist_ok=True)
    found = {}
    for name, dirs in runs.items():
        dirs = [dirs] if isinstance(dirs, str) else list(dirs)
        for d in dirs[:1]:  # the first fold stands for the rest
            for png in ("training_curves.png", "reconstruction_samples.png"):
                src = Path(d) / png
                if src.is_file():
                    dst = fig / f"{name}_{png}"
                    shutil.copyfile(src, dst)
                    found[f"{name} {png[:-4].replace('_', ' ')}"] = str(dst.relative_to(out))
    src = Path(stack_dir) / "stack_ablation.png"
    if src.is_file():
        shutil.copyfile(src, fig / "stack_ablation.png")
        found["stack ablation"] = "figures/stack_ablation.png"
    return found


def _versus_best_expert(df: pd.DataFrame, stack: dict | None, split: str, n_boot: int) -> dict | None:
    """The meta-model (on every sample) and the cascade against the expert that was best in meta-CV.

    The expert is chosen on the OOF table (stack_results.json), never on this split; the CI is a
    grouped bootstrap of the paired AUC difference (``thresholds.auc_difference``).
    """
    from distrib.stacking.evaluate import verdict
    from distrib.stacking.thresholds import auc_difference

    if not stack or "meta_prob" not in df.columns:
        return None
    best = stack["best_expert"]
    col = f"prob_{best.split(':', 1)[1]}"
    if col not in df.columns or df["label"].nunique() < 2:
        return None
    out = {"best_expert": best, "meta": stack.get("meta", "lightgbm"), "split": split}
    for who, score in (("the meta-model", "meta_prob"), ("the cascade", "cascade_score")):
        cmp = auc_difference(df["label"], df[score], df[col], df["group"], n_boot, seed=0)
        out[score] = {**cmp, "verdict": verdict(cmp, f"{split} (cascade run)", best, who)}
    return out


def _expert_cost(df: pd.DataFrame, esc: np.ndarray, cost: dict, models: dict) -> dict:
    """How many models each expert ran; with refit experts, the K-fold experts' cost on the same images
    (always 2+3 measured; the cascade with them = stage 1 + their per-image 2+3 cost on escalated rows)."""
    out = {
        "models_per_expert": {k: v["models_run"] for k, v in models.items()},
        "expert_models": sorted({v["inference"] for v in models.values()}),
    }
    if "always23_folds_cost_ms" in df.columns:
        folds = df["stage1_cost_ms"].to_numpy() + np.where(esc, df["always23_folds_cost_ms"].to_numpy(), 0.0)
        out["always23_folds_mean_ms"], out["always23_folds_p95_ms"] = _stats(df["always23_folds_cost_ms"])
        out["cascade_folds_mean_ms"], out["cascade_folds_p95_ms"] = _stats(folds)
        out["cascade_folds_ratio_to_stage1"] = out["cascade_folds_mean_ms"] / max(cost["stage1_mean_ms"], 1e-9)
    return out


def _refit_vs_folds(df: pd.DataFrame, split: str, stack: dict | None) -> dict | None:
    """The meta-model's AUC on this split with refit experts vs the K fold models (both measured here), and
    the stack's own val/test comparison; a negative ``diff_refit_minus_folds`` is a loss of AUC."""
    from distrib.metrics import binary_metrics as bm

    refit = (stack or {}).get("refit_splits")
    if "meta_prob_folds" not in df.columns and not refit:
        return None
    out = {
        "stack_refit_splits": {
            k: {
                "meta_auc_refit": v["meta_auc"],
                "meta_auc_folds": v["meta_auc_folds"],
                "diff_refit_minus_folds": v["diff_refit_minus_folds"],
            }
            for k, v in (refit or {}).items()
        }
    }
    if "meta_prob_folds" in df.columns:
        y = df["label"].to_numpy().astype(int)
        a_refit, a_folds = bm(y, df["meta_prob"])["auc"], bm(y, df["meta_prob_folds"])["auc"]
        out["this_run"] = {
            "split": split,
            "meta_auc_refit": a_refit,
            "meta_auc_folds": a_folds,
            "diff_refit_minus_folds": a_refit - a_folds,
        }
    return out


def evaluate_cascade(
    df: pd.DataFrame,
    cfg,
    split: str,
    out: Path,
    th1: dict,
    th3: dict,
    tau: float,
    expert_thresholds: dict[str, float],
    skipped: int = 0,
    runs: dict | None = None,
    classes: dict | None = None,
    models: dict | None = None,
) -> dict:
    """Write evaluation_results.json + plots + report.md from the per-sample cascade table; return the results."""
    from distrib.cascade.complementarity import analyse
    from distrib.cascade.report import write_report
    from distrib.plots import plot_bars, plot_pr, plot_roc

    y = df["label"].to_numpy().astype(int)
    esc = df["escalated"].to_numpy().astype(bool)
    t1 = th1["single"]["youden"]["threshold"]
    metrics = {
        "cascade": binary_metrics(y, df["cascade_score"], 0.5),
        "stage1": binary_metrics(y, df["stage1_prob"], t1),
    }
    curves = {"cascade": (y, df["cascade_score"].to_numpy()), "stage 1": (y, df["stage1_prob"].to_numpy())}
    all_stages = "meta_prob" in df.columns
    if all_stages:
        for name, thr in expert_thresholds.items():
            metrics[f"expert:{name}"] = binary_metrics(y, df[f"prob_{name}"], thr)
            curves[name] = (y, df[f"prob_{name}"].to_numpy())
        metrics["meta (stage 2+3 on all)"] = binary_metrics(y, df["meta_prob"], tau)
        curves["meta on all"] = (y, df["meta_prob"].to_numpy())
    if "meta_prob_folds" in df.columns:
        metrics["meta (stage 2+3 on all, K fold models)"] = binary_metrics(y, df["meta_prob_folds"], tau)
    if esc.any():
        metrics["meta on escalated"] = binary_metrics(y[esc], df.loc[esc, "meta_prob_escalated"], tau)
    thresholds_used = {
        "stage1_band": {k: th1["band"].get(k) for k in ("feasible", "t_low", "t_high", "message")},
        "stage1_single_youden": t1,
        "meta_rule": cfg.stack.rule,
        "meta_threshold": tau,
        "experts_youden_oof": expert_thresholds,
    }

    cost = {
        "cascade_mean_ms": _stats(df["cost_ms"])[0],
        "cascade_p95_ms": _stats(df["cost_ms"])[1],
        "stage1_mean_ms": _stats(df["stage1_cost_ms"])[0],
        "stage1_p95_ms": _stats(df["stage1_cost_ms"])[1],
    }
    cost["cost_ratio_to_stage1"] = cost["cascade_mean_ms"] / max(cost["stage1_mean_ms"], 1e-9)
    if all_stages:
        cost["always23_mean_ms"], cost["always23_p95_ms"] = _stats(df["always23_cost_ms"])
        cost["cost_ratio_to_always23"] = cost["cascade_mean_ms"] / max(cost["always23_mean_ms"], 1e-9)
    cost.update(_expert_cost(df, esc, cost, models or {}))
    cost["note"] = (
        "model compute per image (batched), excluding data loading; escalated rows share their stage 2+3 batch"
    )

    comp_rows = slice(None) if all_stages else esc
    comp = None
    if len(expert_thresholds) >= 2 and all_stages:
        comp = analyse(
            y[comp_rows],
            {n: df.loc[comp_rows, f"prob_{n}"].to_numpy() for n in expert_thresholds},
            expert_thresholds,
            df.loc[comp_rows, "key"].to_numpy(),
            out_dir=out,
        )
    plots = {
        "roc": plot_roc(curves, out / "roc.png", title=f"ROC on {split}").name,
        "pr": plot_pr(curves, out / "pr.png", title=f"Precision-recall on {split}").name,
        "cost": plot_bars(
            {k.replace("_mean_ms", ""): v for k, v in cost.items() if k.endswith("_mean_ms")},
            out / "cost_per_image.png",
            "Mean cost per image",
            "ms",
        ).name,
    }
    for sub, th in (("stage1", th1), ("stage3", th3)):
        for key, png in (th.get("plots") or {}).items():
            if (out / sub / png).is_file():
                plots[f"{sub} {key}"] = f"{sub}/{png}"
    if comp and comp.get("plot"):
        plots["complementarity"] = comp["plot"]
    plots.update(_copy_figures(out, runs or {}, cfg.stack.dir))

    stack_results = Path(cfg.stack.dir) / "stack_results.json"
    stack = json.loads(stack_results.read_text()) if stack_results.is_file() else None
    results = {
        "name": cfg.name,
        "split": split,
        "n": int(len(df)),
        "positives": int(y.sum()),
        **(classes or {}),
        "skipped_samples": int(skipped),
        "escalation_rate": float(esc.mean()),
        "escalated": int(esc.sum()),
        "evaluate_all_stages": all_stages,
        "metrics": metrics,
        "thresholds": thresholds_used,
        "cost": cost,
        "complementarity": comp,
        "plots": plots,
        "stack": stack,
        "stage3_vs_best_expert": _versus_best_expert(df, stack, split, cfg.bootstrap),
        "refit_vs_folds": _refit_vs_folds(df, split, stack),
        "predictions": "cascade_predictions.csv",
    }
    best = [k for k in metrics if k.startswith("expert:")]
    if best:
        top = max(best, key=lambda k: metrics[k]["auc"] if math.isfinite(metrics[k]["auc"]) else -1)
        results["best_expert"] = top
        results["auc_delta_vs_best_expert"] = metrics["cascade"]["auc"] - metrics[top]["auc"]
    if cfg.group_agg != "none":  # e.g. DeepfakeBench's video_auc: each video scored by its frames' mean/max
        results["group_metrics"] = {
            name: group_metrics(df["group"].astype(str), yy, score, cfg.group_agg)
            for name, (yy, score) in curves.items()
        }
    results = json_safe(results)
    path = out / "evaluation_results.json"
    write_json(path, results)
    results["evaluation_results"] = str(path)
    results["report"] = str(write_report(results, out))
    return results
