"""`distrib bench cascade`: the cascade's cost per image vs stage 1 alone, and its AUC vs the best single expert.

    distrib bench cascade --config runs/demo/cascade.yaml [--out DIR] [split=val]
    distrib bench cascade build=easy [square=20] [--out DIR]   # a dataset where stage 1 is strong + a refit cascade

Both ratios come from one cascade run on the same samples: stage 1 alone is timed on every batch
inside it, and the experts are scored on every sample (``evaluate_all_stages``), so no baseline is
taken from another run or machine state. Targets: cost_ratio_to_stage1 <= 1.5 wherever stage 1
auto-decides >= 90% of images (``cost_target_applies``), auc_delta >= 0. ``build=easy``
(``bench.easy_cascade``) shows it on a synthetic separable task with refit experts; the result names
the dataset, how many models each expert ran, the K-fold cascade's ratio on the same images, and
the meta AUC with refit vs fold experts.
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
    raise DistribError(
        "bench cascade needs a cascade YAML: pass --config CASCADE.yaml (e.g. the one 'make demo' "
        f"writes; looked for {', '.join(DEFAULT_CONFIGS)})"
    )


def _refit_aucs(rv: dict | None) -> dict | None:
    """{split: {meta_auc_folds, meta_auc_refit, diff_refit_minus_folds}} from the stack and this run."""
    if not rv:
        return None
    out = dict(rv.get("stack_refit_splits") or {})
    if rv.get("this_run"):
        out[f"{rv['this_run']['split']} (cascade run)"] = {k: v for k, v in rv["this_run"].items() if k != "split"}
    return out


def run(config: str | None = None, out: str | None = None, overrides=()) -> dict:
    from distrib.cascade.config import load_cascade_config
    from distrib.cascade.run import run_cascade

    opts = dict(o.split("=", 1) for o in overrides or [] if "=" in o)
    dataset = None
    if opts.get("build") == "easy":  # a dataset where stage 1 is strong, and a refit cascade on it
        from distrib.bench.easy_cascade import DATASET, build_cascade

        square = int(opts.get("square", 20))
        config = str(build_cascade(Path(out or "runs/bench_easy_cascade"), square))
        dataset = DATASET.replace("20x20", f"{square}x{square}")
    elif opts.get("build"):
        raise DistribError(f"bench cascade build={opts['build']}: the one built dataset is build=easy")
    path = _find_config(config)
    if not load_cascade_config(path).evaluate_all_stages:
        raise DistribError(
            f"{path}: bench cascade compares against the experts on every sample; set evaluate_all_stages: true"
        )
    split = opts.get("split", "test")
    out = path.parent / f"bench_cascade_{split}" if dataset or not out else Path(out)
    res = run_cascade(path, split, out)
    cost, m = res["cost"], res["metrics"]
    best = res.get("best_expert")
    result = {
        "bench": "cascade",
        "split": split,
        "n": res["n"],
        "escalation_rate": res["escalation_rate"],
        "cascade_mean_ms": cost["cascade_mean_ms"],
        "cascade_p95_ms": cost["cascade_p95_ms"],
        "stage1_mean_ms": cost["stage1_mean_ms"],
        "always23_mean_ms": cost.get("always23_mean_ms"),
        "cost_ratio_to_stage1": cost["cost_ratio_to_stage1"],
        "cost_ratio_to_always23": cost.get("cost_ratio_to_always23"),
        "cascade_auc": m["cascade"]["auc"],
        "best_expert": best,
        "best_expert_auc": m[best]["auc"] if best else None,
        "auc_delta_vs_best_expert": res.get("auc_delta_vs_best_expert"),
        "targets": {
            "cost_ratio_to_stage1": "<= 1.5 where stage 1 auto-decides >= 90%",
            "auc_delta_vs_best_expert": ">= 0",
        },
        "dataset": dataset or str(res.get("name")),
        "stage1_auto_decided": 1.0 - res["escalation_rate"],
        "expert_models": cost.get("expert_models"),
        "models_per_expert": cost.get("models_per_expert"),
        "cascade_folds_ratio_to_stage1": cost.get("cascade_folds_ratio_to_stage1"),
        "always23_folds_mean_ms": cost.get("always23_folds_mean_ms"),
        "meta_auc_refit_vs_folds": _refit_aucs(res.get("refit_vs_folds")),
    }
    delta = result["auc_delta_vs_best_expert"]
    result["cost_target_applies"] = result["stage1_auto_decided"] >= 0.9
    result["cost_target_met"] = bool(result["cost_ratio_to_stage1"] <= 1.5) if result["cost_target_applies"] else None
    result["targets_met"] = bool(result["cost_ratio_to_stage1"] <= 1.5 and delta is not None and delta >= 0)
    print(f"bench cascade: report {res['report']}")
    return result
