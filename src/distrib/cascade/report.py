"""report.md from a cascade's evaluation_results.json: headline table, cost, thresholds, ablation, complementarity.

The report only formats numbers already in evaluation_results.json (no recomputation), so the two
can never disagree; figures are linked with paths relative to the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from distrib.atomic import write_text

COLS = ("auc", "f1", "accuracy", "recall", "specificity", "eer", "ap")


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def headline(results: dict) -> list[str]:
    """The metrics table (one row per stage/scorer) used at the top of report.md."""
    rows = [[name, *[m.get(c) for c in COLS]] for name, m in results["metrics"].items()]
    return _table(["scorer", *COLS], rows)


def group_table(results: dict) -> list[str]:
    """Group-level AUC/EER/AP per scorer (``group_agg`` mean/max), next to the sample-level headline."""
    groups = results.get("group_metrics")
    if not groups:
        return []
    agg = next(iter(groups.values()))["agg"]
    rows = [[name, g.get("n_groups"), g.get("auc"), g.get("eer"), g.get("ap")] for name, g in groups.items()]
    return [
        f"Group level (each group scored by the {agg} of its samples' scores):",
        "",
        *_table(["scorer", "groups", "auc", "eer", "ap"], rows),
    ]


def _ci(c) -> str:
    return "n/a" if not c else f"[{c[0]:+.4f}, {c[1]:+.4f}]"


def stage3_sections(st: dict, live: dict | None) -> list[str]:
    """The meta-learner leaderboard (meta-CV) and the honest val/test comparison with the best expert."""
    best = st["best_expert"].split(":", 1)[-1]
    rows = []
    for name, c in (st.get("candidates") or {}).items():
        diffs = " ".join(f"{d:+.3f}" for d in c["diff_vs_best_expert"])
        rows.append(
            [
                f"**{name}** (chosen)" if name == st.get("meta") else name,
                c["auc_mean"],
                c["auc_std"],
                f"{c['diff_mean']:+.4f}",
                diffs,
                f"{c['folds_above_best_expert']}/{len(c['per_fold'])}",
            ]
        )
    lines = []
    if rows:
        lines += [
            "## Meta-learner leaderboard (grouped meta-CV on the OOF table, same folds for all)",
            "",
            *_table(
                ["candidate", "CV AUC mean", "CV AUC std", f"mean diff vs {best}", "per-fold diff", "folds above"], rows
            ),
            f"`stack.meta: {st.get('meta_setting', 'lightgbm')}` -> **{st.get('meta', 'lightgbm')}** "
            f"(auto picks the best mean CV AUC; within {st.get('tie', 0)} the simpler one wins). "
            f"Best expert: `{best}`.",
            "",
        ]
    comp = [(split, s["vs_best_expert"]) for split, s in (st.get("splits") or {}).items() if "vs_best_expert" in s]
    if live:
        comp += [
            (f"{live['split']} (cascade run, {who})", live[key])
            for who, key in (("meta on all", "meta_prob"), ("cascade", "cascade_score"))
        ]
    if comp:
        lines += [
            "## Does stage 3 earn its place? (vs the best expert in meta-CV)",
            "",
            *_table(
                ["rows", "AUC", f"AUC {best}", "difference", "95% CI (grouped bootstrap)"],
                [[name, c["auc"], c["baseline_auc"], f"{c['diff']:+.4f}", _ci(c.get("diff_ci95"))] for name, c in comp],
            ),
            *[f"- {c['verdict']}" for _, c in comp],
            "",
        ]
    return lines


def cost_section(c: dict) -> list[str]:
    """Cost per image: stage 1, the cascade, always 2+3 (as run), and the K-fold experts' cost when refit ran."""
    per = c.get("models_per_expert") or {}
    used = "/".join(c.get("expert_models") or []) or "folds"
    models = f"{used} experts, models per expert: " + (", ".join(f"{k} {v}" for k, v in per.items()) or "n/a")
    s1 = max(c["stage1_mean_ms"], 1e-9)
    rows = [
        ["stage 1 alone", c["stage1_mean_ms"], c["stage1_p95_ms"], 1.0],
        [f"cascade ({models})", c["cascade_mean_ms"], c["cascade_p95_ms"], c["cost_ratio_to_stage1"]],
    ]
    if "always23_mean_ms" in c:
        rows.append(
            [
                f"always stage 2+3 ({used} experts)",
                c["always23_mean_ms"],
                c["always23_p95_ms"],
                c["always23_mean_ms"] / s1,
            ]
        )
    if "cascade_folds_mean_ms" in c:
        rows += [
            [
                "cascade with the K fold models per expert (stage 1 + their 2+3 cost on escalated rows)",
                c["cascade_folds_mean_ms"],
                c["cascade_folds_p95_ms"],
                c["cascade_folds_ratio_to_stage1"],
            ],
            [
                "always stage 2+3 (K fold models per expert)",
                c["always23_folds_mean_ms"],
                c["always23_folds_p95_ms"],
                c["always23_folds_mean_ms"] / s1,
            ],
        ]
    return ["## Cost per image", "", *_table(["path", "mean ms", "p95 ms", "x stage 1"], rows), c["note"], ""]


def refit_section(rv: dict | None) -> list[str]:
    """The meta-model's AUC with refit experts (one model each) vs the K fold models: shown, loss or not."""
    if not rv:
        return []
    rows = [
        [
            f"{k} (stack, meta on every row)",
            v["meta_auc_folds"],
            v["meta_auc_refit"],
            "n/a" if v["diff_refit_minus_folds"] is None else f"{v['diff_refit_minus_folds']:+.4f}",
        ]
        for k, v in rv.get("stack_refit_splits", {}).items()
    ]
    if rv.get("this_run"):
        t = rv["this_run"]
        rows.append(
            [
                f"{t['split']} (this cascade run, meta on all)",
                t["meta_auc_folds"],
                t["meta_auc_refit"],
                f"{t['diff_refit_minus_folds']:+.4f}",
            ]
        )
    return [
        "## Folds vs refit experts (embed.inference)",
        "",
        *_table(["rows", "meta AUC, K fold models", "meta AUC, refit model", "refit - folds"], rows),
        "A negative difference is AUC lost by running one refit model per expert instead of K.",
        "",
    ]


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and return its path."""
    out = Path(out_dir)
    r = results
    lines = [
        f"# {r.get('name', 'cascade')}: evaluation on `{r['split']}`",
        "",
        f"{r['n']} samples ({r['positives']} positive), {r.get('skipped_samples', 0)} corrupt samples skipped. "
        f"Escalated to stages 2+3: **{r['escalation_rate']:.1%}** ({r['escalated']}).",
        "",
        *(
            [
                f"Positive class (label 1): **{r['positive']}**; classes "
                f"{', '.join(f'{k} = {v}' for k, v in sorted(r.get('classes', {}).items()))}.",
                "",
            ]
            if r.get("positive")
            else []
        ),
        "## Quality",
        "",
        *headline(r),
        *group_table(r),
        "Thresholds were fit on OOF/val predictions only; stage 1 alone uses its Youden threshold, the cascade "
        "score maps every decision onto 0.5.",
        "",
    ]
    lines += cost_section(r["cost"]) + refit_section(r.get("refit_vs_folds"))
    t = r["thresholds"]
    band = t["stage1_band"]
    lines += [
        "## Thresholds",
        "",
        f"- Stage-1 band: {band['message']}" + ("" if band["feasible"] else " (**infeasible**: all samples escalate)"),
        f"- Stage-3 meta threshold ({t['meta_rule']}, fit on the meta-model's OOF predictions): {_f(t['meta_threshold'])}",
        "- Experts' own thresholds (Youden on their OOF rows): "
        + ", ".join(f"{k} {_f(v)}" for k, v in t["experts_youden_oof"].items()),
        "",
    ]
    st = r.get("stack")
    if st:
        lines += stage3_sections(st, r.get("stage3_vs_best_expert"))
    if st:
        rows = [[k, v["auc_mean"], v["auc_std"], v.get("n_features")] for k, v in st["ablation"].items()]
        lines += [
            "## Stacking ablation (meta-model's own grouped CV on the OOF table)",
            "",
            *_table(["features", "AUC mean", "AUC std", "n features"], rows),
            f"Configured feature set: `{st['features']}`; best single expert under the same folds: "
            f"`{st['best_expert']}`.",
            "",
        ]
    comp = r.get("complementarity")
    if comp:
        rows = []
        for p in comp["pairs"]:
            a, b = p["experts"]
            rows.append(
                [
                    f"{a} vs {b}",
                    p["disagreement_rate"],
                    p["yules_q"],
                    p["both_wrong_rate"],
                    p["mcnemar"]["p_exact"],
                    p["accuracy_where_disagree"][a],
                    p["accuracy_where_disagree"][b],
                ]
            )
        lines += [
            "## Complementarity of the stage-2 experts",
            "",
            *_table(
                [
                    "pair",
                    "disagreement",
                    "Yule's Q",
                    "both wrong",
                    "McNemar p (exact)",
                    "acc. A where disagree",
                    "acc. B where disagree",
                ],
                rows,
            ),
        ]
        for p in comp["pairs"]:
            for name, keys in (p.get("only_right") or {}).items():
                lines.append(
                    f"- Only `{name}` right (first {len(keys)}): " + (", ".join(f"`{k}`" for k in keys) or "none")
                )
        lines.append("")
    lines += ["## Figures", ""]
    for name, rel in r.get("plots", {}).items():
        lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    lines += [f"Raw numbers: `evaluation_results.json`; per-sample decisions: `{r.get('predictions', '')}`.", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def report_from_json(path: str | Path) -> Path:
    """Re-render report.md from an existing evaluation_results.json."""
    path = Path(path)
    return write_report(json.loads(path.read_text()), path.parent)
