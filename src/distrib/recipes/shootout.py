"""A shoot-out recipe (``mode: shootout``, the pit plan): candidates side by side, then one decision.

Each candidate (an entry of ``experts``) is swept over its grid x the folds and embedded, exactly as a
cascade expert; its 3-way thresholds (recall >= R, specificity >= S) are fit on its OOF rows; its
CPU latency at batch 1 and its size in MB are the means over the best config's fold runs. The
decision follows the plan: the most accurate candidate (OOF AUC) meets every target -> deploy it;
it misses only latency/size -> train the distilled student from it (``shootout.student``) and report
the student as well; otherwise the best candidate that meets every target, or "all fail".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.metrics import binary_metrics
from distrib.recipes.report import pipeline_lines
from distrib.recipes.state import finish


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values else None


def candidate_row(name: str, sweep_dir: Path, thresholds: dict) -> dict:
    """One candidate's facts: OOF AUC/AP, band feasibility and coverage, latency, size, best config."""
    oof = pd.read_parquet(sweep_dir / "oof_embeddings.parquet")
    oof = oof[oof["split"] == "oof"]
    m = binary_metrics(oof["label"].to_numpy(int), oof["prob"].to_numpy(float))
    best = json.loads((sweep_dir / "sweep_results.json").read_text())["best"]
    runs = [json.loads((Path(d) / "evaluation_results.json").read_text()) for d in best["run_dirs"]]
    band = thresholds["band"]
    return {
        "name": name,
        "oof_auc": m["auc"],
        "oof_ap": m["ap"],
        "cv_auc_mean": best["mean"],
        "cv_auc_std": best["std"],
        "config": " ".join(best.get("overrides", [])) or "(base)",
        "band_feasible": bool(band["feasible"]),
        "band_message": band["message"],
        "uncertain_fraction": band.get("uncertain_fraction"),
        "latency_ms": _mean(r.get("latency_ms_per_img_cpu_bs1") for r in runs),
        "size_mb": _mean(r.get("model_file_mb") for r in runs),
        "teacher_run": best["run_dirs"][0],
    }


def misses(row: dict, latency_ms: float, size_mb: float) -> list[str]:
    """The targets ``row`` misses: 'thresholds' (no feasible 3-way band), 'latency', 'size'."""
    out = [] if row.get("band_feasible") else ["thresholds"]
    if latency_ms > 0 and (row.get("latency_ms") is None or row["latency_ms"] > latency_ms):
        out.append("latency")
    if size_mb > 0 and (row.get("size_mb") is None or row["size_mb"] > size_mb):
        out.append("size")
    return out


def decide(rows: list[dict], latency_ms: float, size_mb: float, student: dict | None = None) -> dict:
    """The plan's decision line from the candidate rows (and the student's row, when one was trained)."""
    ranked = sorted(rows, key=lambda r: -(r["oof_auc"] if np.isfinite(r["oof_auc"]) else -1))
    top = ranked[0]
    top_miss = misses(top, latency_ms, size_mb)
    if not top_miss:
        return {
            "action": "deploy",
            "model": top["name"],
            "line": f"Deploy `{top['name']}`: the most accurate candidate meets every target.",
        }
    if "thresholds" not in top_miss:
        line = (
            f"`{top['name']}` is the most accurate but misses {' and '.join(top_miss)}: train the distilled "
            f"student from it"
        )
        if student is None:
            return {"action": "distill", "model": top["name"], "line": line + " (set shootout.student to do it here)."}
        s_miss = misses(student, latency_ms, size_mb)
        verdict = (
            "it meets every target: deploy the student."
            if not s_miss
            else f"the student misses {' and '.join(s_miss)} too."
        )
        return {
            "action": "distill",
            "model": top["name"],
            "student_misses": s_miss,
            "line": f"{line}; student `{student['name']}`: {verdict}",
        }
    ok = [r for r in ranked if not misses(r, latency_ms, size_mb)]
    if ok:
        return {
            "action": "deploy",
            "model": ok[0]["name"],
            "line": f"Deploy `{ok[0]['name']}`: the most accurate candidate that meets every target "
            f"(`{top['name']}` misses {' and '.join(top_miss)}).",
        }
    return {
        "action": "none",
        "model": None,
        "line": "All candidates fail: "
        + "; ".join(f"`{r['name']}` misses {' and '.join(misses(r, latency_ms, size_mb))}" for r in ranked)
        + ".",
    }


def student_row(run_dir: Path, name: str, recall: float, specificity: float) -> dict:
    """The distilled student's facts from its own run (val split; thresholds fit on its val predictions)."""
    from distrib.stacking.thresholds import fit_band

    res = json.loads((run_dir / "evaluation_results.json").read_text())
    val = pd.read_csv(run_dir / "val_predictions.csv")
    band = fit_band(val["label"].to_numpy(int), val["prob"].to_numpy(float), recall, specificity)
    m = res["metrics_at_0.5"]
    return {
        "name": name,
        "oof_auc": m["auc"],
        "oof_ap": m.get("ap"),
        "cv_auc_mean": None,
        "cv_auc_std": None,
        "config": "distilled (val split)",
        "band_feasible": bool(band["feasible"]),
        "band_message": band["message"],
        "uncertain_fraction": band.get("uncertain_fraction"),
        "latency_ms": res.get("latency_ms_per_img_cpu_bs1"),
        "size_mb": res.get("model_file_mb"),
    }


def shootout_lines(rows: list[dict], decision: dict, targets: dict) -> list[str]:
    def f(v, d=4):
        return f"{v:.{d}f}" if isinstance(v, (int, float)) and np.isfinite(v) else "n/a"

    lines = [
        "## Shoot-out",
        "",
        f"Targets: recall >= {targets['recall']}, specificity >= {targets['specificity']} "
        f"(3-way band on OOF rows), CPU latency <= {targets['latency_ms'] or 'any'} ms/img at batch 1, "
        f"size <= {targets['size_mb'] or 'any'} MB.",
        "",
        "| candidate | best config | OOF AUC | OOF AP | CV AUC | 3-way band (uncertain) | ms/img | MB | misses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        miss = misses(r, targets["latency_ms"], targets["size_mb"])
        lines.append(
            f"| {r['name']} | `{r['config']}` | {f(r['oof_auc'])} | {f(r['oof_ap'])} | "
            f"{f(r['cv_auc_mean'])} | {'feasible' if r['band_feasible'] else 'infeasible'} "
            f"({f(r.get('uncertain_fraction'), 2)}) | "
            f"{f(r['latency_ms'], 2)} | {f(r['size_mb'], 1)} | {', '.join(miss) or '-'} |"
        )
    return lines + ["", f"**Decision:** {decision['line']}", ""]


def run_shootout_steps(recipe, res: dict, out: Path, steps, path, t_start: float, extra: dict | None) -> dict:
    """After the candidates' sweeps: thresholds per candidate, the student if the decision asks for it,
    then report.md (the shoot-out table and the decision line) and evaluation_results.json."""
    import time

    from distrib.atomic import write_json, write_text
    from distrib.config import load_config
    from distrib.runs import find_checkpoint
    from distrib.stacking.thresholds import fit_thresholds, load_predictions, select_fit_rows
    from distrib.training.trainer import run as train_run

    th, sh = recipe.thresholds, recipe.shootout
    rows = []
    for cfg, _ in res["experts"]:
        sweep, th_dir = out / f"sweep_{cfg.name}", out / f"thresholds_{cfg.name}"
        oof, th_file = sweep / "oof_embeddings.parquet", th_dir / f"{cfg.name}_thresholds.json"
        steps(
            f"thresholds {cfg.name}",
            [th_file],
            lambda: fit_thresholds(
                select_fit_rows(load_predictions(oof), th.fit_split, str(oof)), th, th_dir, name=cfg.name
            ),
        )
        rows.append(candidate_row(cfg.name, sweep, json.loads(th_file.read_text())))
    targets = {"recall": th.recall, "specificity": th.specificity, "latency_ms": sh.latency_ms, "size_mb": sh.size_mb}
    decision, student = decide(rows, sh.latency_ms, sh.size_mb), None
    if sh.student and decision["action"] == "distill":
        teacher = next(r for r in rows if r["name"] == decision["model"])["teacher_run"]
        normalize = load_config(Path(teacher) / "config.yaml").data.normalize  # the student sees the teacher's input
        cfg = load_config(
            sh.student,
            [
                *res["common"],
                "data.fold=-1",
                *sh.student_overrides,
                f"train.distill_teacher={teacher}",
                f"data.normalize={normalize}",
            ],
        )
        s_dir = out / "student"
        steps(
            "student",
            [s_dir / "evaluation_results.json", s_dir / "val_predictions.csv"],
            lambda: train_run(cfg, s_dir, resume=find_checkpoint(s_dir) is not None),
        )
        student = student_row(s_dir, f"{cfg.name} (student of {decision['model']})", th.recall, th.specificity)
        decision = decide(rows, sh.latency_ms, sh.size_mb, student)
    elif sh.student:
        steps.bar.write("==> student: not needed by the decision")
        steps.bar.update(1)
    table = rows + ([student] if student else [])

    def report() -> None:
        info = {
            **(extra or {}),
            "recipe": str(Path(path).resolve()),
            "name": recipe.name,
            "step_seconds": dict(steps.times),
            "skipped": list(steps.skipped),
            "wall_seconds_this_run": round(time.time() - t_start, 1),
            "sweeps": {
                c.name: {
                    k: v
                    for k, v in json.loads((out / f"sweep_{c.name}" / "sweep_results.json").read_text()).items()
                    if k in ("best", "trials", "done")
                }
                for c, _ in res["experts"]
            },
        }
        write_json(
            out / "evaluation_results.json",
            {
                "mode": "shootout",
                "name": recipe.name,
                "targets": targets,
                "candidates": table,
                "decision": decision,
                "pipeline": info,
            },
        )
        write_text(
            out / "report.md",
            "\n".join(
                [f"# {recipe.name}: shoot-out", "", *shootout_lines(table, decision, targets), *pipeline_lines(info)]
            )
            + "\n",
        )

    steps("report", [], report)
    return {**finish(steps, out), "decision": decision["line"]}
