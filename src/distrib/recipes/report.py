"""The recipe's own section of ``report.md``: sweeps, stack, step times (under the cascade's report)."""

from __future__ import annotations

from pathlib import Path

MARK = "## Pipeline"


def _f(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"


def pipeline_lines(info: dict) -> list[str]:
    lines = ["", MARK, "", f"Recipe `{info['name']}` ({info['recipe']})."]
    if "leak_check" in info:
        lines += [
            "",
            f"Demo size `{info.get('size', '')}`; colour-histogram leak check AUC "
            f"**{info['leak_check']['auc']:.3f}** (a colour-only classifier near 0.5 means colour does not "
            "give the label away).",
        ]
        if isinstance(info.get("data"), dict) and "build_and_leak_check_seconds" in info["data"]:
            lines[-1] += f" Data build + leak check: {info['data']['build_and_leak_check_seconds']} s."
    s1 = info.get("stage1_metrics")
    lines += (
        []
        if not s1
        else [
            "",
            f"Stage 1: val AUC {_f(s1.get('auc'))}, AP {_f(s1.get('ap'))}, "
            f"{_f(s1.get('latency_ms_per_img_cpu_bs1'), 2)} ms/img (CPU, batch 1).",
        ]
    )
    lines += ["", "| expert sweep | best config | mean CV AUC | std | folds |", "|---|---|---|---|---|"]
    for name, sweep in info["sweeps"].items():
        best = sweep.get("best") or {}
        lines.append(
            f"| {name} | `{' '.join(best.get('overrides', [])) or '(base)'}` | {_f(best.get('mean'))} | "
            f"{_f(best.get('std'))} | {len(best.get('run_dirs', []))} |"
        )
    cv = info.get("stack")
    lines += [] if not cv else ["", f"Stack meta-CV AUC {_f(cv.get('auc_mean'))} +- {_f(cv.get('auc_std'))}."]
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [
        f"| {k} | {v}{' (earlier run)' if k in info.get('skipped', []) else ''} |"
        for k, v in info["step_seconds"].items()
    ]
    return lines


def append_pipeline_report(report: Path, info: dict) -> None:
    """Put the pipeline section under the cascade's report, replacing one a previous run appended."""
    text = report.read_text() if report.is_file() else f"# {info['name']}\n"
    text = text.split("\n" + MARK + "\n", 1)[0].rstrip("\n") + "\n"
    from distrib.atomic import write_text

    write_text(report, text + "\n".join(pipeline_lines(info)) + "\n")
