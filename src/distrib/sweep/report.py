"""Sweep outputs: sweep_summary.csv, best_config.yaml (mean CV AUC, ties -> lower std), fold_auc.png.

Read from each trial's ``trial_result.json`` (written by the trial itself), so the summary is the same
for a fresh, retried or ``--resume``d sweep and does not depend on Ray's internal result format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from distrib.atomic import atomic_path, save_figure, write_json, write_text
from distrib.config import ExperimentConfig, config_to_dict, load_config
from distrib.errors import DistribError
from distrib.sweep.grid import grid_configs, trial_command, trial_overrides

METRICS = ("auc", "f1", "recall", "specificity", "ap", "group_auc", "group_ap")  # group_*: eval.group_agg
COLUMNS = [
    "config_id",
    "fold",
    "params",
    *METRICS,
    "epochs",
    "seconds",
    "status",
    "trial_dir",
    "command",
    "folds_done",
    "config_status",
    "node_id",
    "node_ip",
    "hostname",
    "attempts",
    "resume_step",
]  # node: the Ray node of the last attempt


def pick_metric(metrics: dict, name: str) -> float:
    """The validation value of ``name`` whatever prefix the trainer used (val_auc, val/auc, auc)."""
    for key in (f"val_{name}", f"val/{name}", f"val.{name}", name):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return float("nan")


def collect_rows(out_dir: Path, grid: dict, folds: int, configs: list[dict] | None = None) -> pd.DataFrame:
    """One row per expected (config, fold); trials that did not finish get status 'missing', or 'stopped'
    when ASHA stopped their config (``configs``: sampled configs with a status; default the grid's).
    ``folds_done`` / ``config_status`` (complete, stopped, error, incomplete) describe the whole config."""
    rows = []
    for c in configs or grid_configs(grid):
        first = len(rows)
        for k in range(folds):
            run_dir = out_dir / "trials" / f"{c['id']}_fold{k}"
            res_path = run_dir / "trial_result.json"
            row = {
                "config_id": c["id"],
                "fold": k,
                "params": "; ".join(c["overrides"]) or "(base)",
                "trial_dir": str(run_dir),
                "epochs": 0,
                "seconds": float("nan"),
                "status": "stopped" if c.get("status") == "stopped" else "missing",
                "command": trial_command(out_dir / "config.yaml", run_dir, trial_overrides(c["overrides"], k)),
            }
            row.update({m: float("nan") for m in METRICS})
            if res_path.is_file():
                res = json.loads(res_path.read_text())
                met = res.get("metrics", {})
                row.update({m: pick_metric(met, m) for m in METRICS})
                row.update(
                    status="done",
                    seconds=res["seconds"],
                    command=res["command"],
                    epochs=int(res.get("epochs", 0)),
                    **{k: res.get(k) for k in ("node_id", "node_ip", "hostname", "attempts", "resume_step")},
                )
            rows.append(row)
        done = sum(r["status"] == "done" for r in rows[first:])
        status = (
            "complete" if done == folds else {"stopped": "stopped", "error": "error"}.get(c.get("status"), "incomplete")
        )
        for r in rows[first:]:
            r.update(folds_done=done, config_status=status)
    return pd.DataFrame(rows, columns=COLUMNS)


def choose_best(summary: pd.DataFrame, metric: str = "auc", folds: int | None = None) -> dict:
    """Config with the highest mean ``metric`` over folds; ties (within 1e-12) go to the lower std.

    Only configs with every fold finished compete (a partial config's mean is over different data).
    std is the sample std (ddof=1) across folds. Returns id, mean, std and the per-config table.
    """
    done = summary[summary["status"] == "done"].dropna(subset=[metric])
    folds = folds or int(summary["fold"].nunique())
    table = done.groupby("config_id", sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
    table["std"] = table["std"].fillna(0.0)
    complete = table[table["count"] == folds]
    if complete.empty:
        raise DistribError(
            f"no config finished all {folds} folds with a '{metric}' value; see "
            "sweep_summary.csv (status column) and the trial dirs' training logs, then rerun "
            "with --resume"
        )
    top = complete["mean"].max()
    tied = complete[np.isclose(complete["mean"], top, rtol=0.0, atol=1e-12)]
    best = tied.sort_values("std", kind="stable").iloc[0]
    return {
        "config_id": str(best["config_id"]),
        "mean": float(best["mean"]),
        "std": float(best["std"]),
        "folds": folds,
        "table": table.to_dict("records"),
    }


def plot_fold_auc(summary: pd.DataFrame, path: Path, best_id: str | None = None) -> Path:
    """Per-fold AUC dots per config with the mean +- std bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(dict.fromkeys(summary["config_id"]))
    fig, ax = plt.subplots(figsize=(1.8 + 0.9 * len(ids), 3.6))
    for i, cid in enumerate(ids):
        sub = summary[(summary["config_id"] == cid) & summary["auc"].notna()]
        ax.scatter(np.full(len(sub), i), sub["auc"], s=18, zorder=3)
        for _, r in sub.iterrows():
            ax.annotate(str(int(r["fold"])), (i, r["auc"]), xytext=(4, 0), textcoords="offset points", fontsize=6)
        if len(sub):
            ax.errorbar(
                i + 0.15,
                sub["auc"].mean(),
                yerr=sub["auc"].std(ddof=1) if len(sub) > 1 else 0,
                fmt="s",
                color="k" if cid != best_id else "crimson",
                capsize=3,
            )
    ax.set_xticks(range(len(ids)), [f"{c}*" if c == best_id else c for c in ids])
    ax.set(ylabel="validation AUC (held-out fold)", title="Per-fold AUC per config (* = best mean)")
    return save_figure(fig, path)


def write_outputs(
    out_dir: Path,
    grid: dict,
    cfg: ExperimentConfig,
    errors: list[str] | None = None,
    timing: dict | None = None,
    configs: list[dict] | None = None,
) -> dict:
    """Write sweep_summary.csv, fold_auc.png, best_config.yaml and sweep_results.json; return the summary.
    ``configs``: a random/optuna sweep's sampled configs (``search.sampled_configs``), else the grid's."""
    configs = configs or grid_configs(grid)
    summary = collect_rows(out_dir, grid, cfg.tune.folds, configs)
    empty = [m for m in METRICS if m.startswith("group_") and summary[m].isna().all()]  # eval.group_agg none
    with atomic_path(out_dir / "sweep_summary.csv") as tmp:
        summary.drop(columns=empty).to_csv(tmp, index=False)
    result: dict = {
        "sweep_dir": str(out_dir),
        "trials": len(summary),
        "done": int((summary["status"] == "done").sum()),
        "stopped": int((summary["status"] == "stopped").sum()),
        "errors": errors or [],
        **(timing or {}),
    }
    if cfg.tune.search != "grid":
        result.update(search=cfg.tune.search, scheduler=cfg.tune.scheduler, configs=configs)
    try:
        best = choose_best(summary, "auc", cfg.tune.folds)
    except DistribError as e:
        result["best"] = None
        result["best_error"] = str(e)
        best = None
    plot_fold_auc(summary, out_dir / "fold_auc.png", best and best["config_id"])
    if best:
        overrides = next(c["overrides"] for c in configs if c["id"] == best["config_id"])
        best_cfg = load_config(out_dir / "config.yaml", overrides)
        header = (
            f"# best config {best['config_id']} of the sweep in {out_dir}: mean CV AUC "
            f"{best['mean']:.4f} +- {best['std']:.4f} (std over {best['folds']} folds)\n"
            f"# grid overrides: {' '.join(overrides) or '(none)'}\n"
        )
        write_text(out_dir / "best_config.yaml", header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False))
        runs = summary[summary["config_id"] == best["config_id"]].sort_values("fold")["trial_dir"].tolist()
        result["best"] = {**best, "overrides": overrides, "run_dirs": runs}
    write_json(out_dir / "sweep_results.json", result, indent=1)
    return result


def best_run_dirs(sweep_dir: str | Path) -> list[str]:
    """The fold run dirs of a finished sweep's best config, read from its sweep_results.json."""
    res = Path(sweep_dir) / "sweep_results.json"
    if not res.is_file():
        raise DistribError(f"{res} not found; run 'distrib tune ... --out {sweep_dir}' first")
    best = json.loads(res.read_text()).get("best")
    if not best:
        raise DistribError(f"{res} has no best config (no config finished every fold); rerun with --resume")
    return list(best["run_dirs"])
