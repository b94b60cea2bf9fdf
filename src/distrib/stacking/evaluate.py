"""The fitted meta-model against the best expert on val/test (AUC difference with a grouped-bootstrap CI,
one plain verdict line), with the K fold models' embeddings and, under ``embed.inference: refit``, with
each expert's one refit model.
"""

from __future__ import annotations

import pandas as pd
from sklearn.metrics import roc_auc_score

from distrib.config import StackConfig
from distrib.metrics import group_metrics
from distrib.stacking.refit import refit_table
from distrib.stacking.tables import STAGE1, load_stage1
from distrib.stacking.thresholds import auc_difference


def versus_best_expert(part: pd.DataFrame, split: str, best_expert: str, cfg: StackConfig) -> dict | None:
    """Val/test: meta AUC, every expert's AUC, and AUC(meta) - AUC(best expert) with its grouped CI."""
    if part["label"].nunique() < 2:
        return None
    experts = [c for c in part.columns if c.startswith("prob_")]
    cmp = auc_difference(
        part["label"],
        part["prob"],
        part[f"prob_{best_expert.split(':', 1)[1]}"],
        part["group"],
        cfg.bootstrap,
        cfg.seed,
    )
    out = {
        "meta_auc": cmp["auc"],
        **{f"{k}_auc": float(roc_auc_score(part["label"], part[k])) for k in experts},
        "vs_best_expert": {**cmp, "verdict": verdict(cmp, split, best_expert)},
    }
    if cfg.group_agg != "none":
        out["group"] = {
            k: group_metrics(part["group"], part["label"], part[k], cfg.group_agg) for k in ["prob", *experts]
        }
    return out


def verdict(cmp: dict, split: str, best_expert: str, who: str = "the meta-model") -> str:
    """One plain line: is ``who`` better than the best expert on this split, and how sure."""
    ci = cmp.get("diff_ci95")
    ci_txt = f", 95% grouped-bootstrap CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    nums = f"AUC {cmp['auc']:.4f} vs {cmp['baseline_auc']:.4f}, difference {cmp['diff']:+.4f}{ci_txt}"
    name = best_expert.split(":", 1)[-1]
    if cmp["diff"] <= 0:
        return f"On {split} {who} is NOT better than the best expert ({name}): {nums}."
    if ci and ci[0] > 0:
        return f"On {split} {who} beats the best expert ({name}): {nums}."
    return f"On {split} {who} is higher than the best expert ({name}) but not clearly (the CI includes 0): {nums}."


def compare_refit(experts, model, stage1, split_metrics: dict, best_expert: str, cfg) -> dict | None:
    """embed.inference=refit: the same meta-model on val/test rows embedded by each expert's ONE refit model,
    next to the K-fold average (``meta_auc_folds``); a loss of AUC shows as a negative ``diff_refit_minus_folds``."""
    rt = refit_table(experts)
    if rt is None:
        return None
    if stage1 and STAGE1 in model.columns:
        rt[STAGE1], _ = load_stage1(stage1, rt["key"])
    part = rt[["key", "group", "label", "split"]].assign(
        prob=model.predict(rt), **{f"prob_{e['name']}": rt[f"{e['name']}__prob"] for e in experts}
    )
    out = {}
    for split, rows in part.groupby("split"):
        cmp = versus_best_expert(rows.reset_index(drop=True), f"{split} (refit experts)", best_expert, cfg)
        folds = (split_metrics.get(split) or {}).get("meta_auc")
        if cmp:
            out[split] = {
                **cmp,
                "meta_auc_folds": folds,
                "diff_refit_minus_folds": None if folds is None else cmp["meta_auc"] - folds,
            }
    return out
