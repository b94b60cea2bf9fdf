"""`distrib bench cascade`: the cascade's cost per image vs stage 1 alone, and its AUC vs the best single expert.

    distrib bench cascade --config runs/demo/cascade.yaml [--out DIR] [split=val]

Both ratios come from one cascade run on the same samples: stage 1 alone is timed on every batch
inside it, and the experts are scored on every sample (``evaluate_all_stages``), so no baseline is
taken from another run or machine state. Targets: cost_ratio_to_stage1 <= 1.5, auc_delta >= 0.
"""
from __future__ import annotations

from pathlib import Path

from distrib.errors import DistribError

DEFAULT_CONFIGS = ("runs/demo/cascade.yaml", "runs/demo/cascade/cascade.yaml")


def _find_config(config: str | None) -> Path:
    if config:
        return Path(config)
    for cand in DEFAULT_CONFIGS:
        if Path(cand).is_file():
            return Path(cand)
    raise DistribError("bench cascade needs a cascade YAML: pass --config CASCADE.yaml (e.g. the one 'make demo' "
                       f"writes; looked for {', '.join(DEFAULT_CONFIGS)})")


def run(config: str | None = None, out: str | None = None, overrides=()) -> dict:
    from distrib.cascade.run import run_cascade
    from distrib.cascade.config import load_cascade_config

    path = _find_config(config)
    if not load_cascade_config(path).evaluate_all_stages:
        raise DistribError(f"{path}: bench cascade compares against the experts on every sample; "
                           "set evaluate_all_stages: true")
    split = "test"
    for o in overrides or []:
        if o.startswith("split="):
            split = o.split("=", 1)[1]
    out = Path(out) if out else path.parent / f"bench_cascade_{split}"
    res = run_cascade(path, split, out)
    cost, m = res["cost"], res["metrics"]
    best = res.get("best_expert")
    result = {
        "bench": "cascade", "split": split, "n": res["n"], "escalation_rate": res["escalation_rate"],
        "cascade_mean_ms": cost["cascade_mean_ms"], "cascade_p95_ms": cost["cascade_p95_ms"],
        "stage1_mean_ms": cost["stage1_mean_ms"], "always23_mean_ms": cost.get("always23_mean_ms"),
        "cost_ratio_to_stage1": cost["cost_ratio_to_stage1"],
        "cost_ratio_to_always23": cost.get("cost_ratio_to_always23"),
        "cascade_auc": m["cascade"]["auc"], "best_expert": best,
        "best_expert_auc": m[best]["auc"] if best else None,
        "auc_delta_vs_best_expert": res.get("auc_delta_vs_best_expert"),
        "targets": {"cost_ratio_to_stage1": "<= 1.5", "auc_delta_vs_best_expert": ">= 0"},
    }
    delta = result["auc_delta_vs_best_expert"]
    result["targets_met"] = bool(result["cost_ratio_to_stage1"] <= 1.5 and delta is not None and delta >= 0)
    print(f"bench cascade: report {res['report']}")
    return result
