"""Stage 3: candidate meta-learners over the experts' OOF probabilities, aligned embeddings, reconstruction
error and (optionally) stage 1's probability, chosen by the meta-model's own grouped CV.

    distrib stack --oof runs/cnn/oof_embeddings.parquet runs/genconvit/oof_embeddings.parquet --out runs/stack

Honest evaluation: the meta-model gets its OWN grouped K-fold CV (StratifiedGroupKFold) on the OOF
rows (split == 'oof'); no group is ever on both sides of a fold (checked, not assumed); inner
searches (LightGBM early stopping, logistic C) use grouped splits of the training part only, so no
score comes from a row the model trained or stopped on. The same folds score every candidate
(``meta.SIMPLICITY``: best_expert, weighted, logistic, lightgbm) and the ablation (each expert
alone, LightGBM on probabilities only, + embeddings, + reconstruction error). ``stack.meta: auto``
takes the best mean CV AUC, ties (within ``stack.tie``) to the simpler candidate, so it is never
below the best expert in CV. The chosen candidate is refit on every OOF row (LightGBM with the
median CV best iteration) and applied to val/test, where its AUC is compared with the best
expert's with a grouped-bootstrap CI of the difference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from distrib.atomic import write_json
from distrib.config import StackConfig
from distrib.errors import DataError, DistribError
from distrib.metrics import binary_metrics, group_metrics
from distrib.stacking.evaluate import compare_refit, versus_best_expert
from distrib.stacking.meta import MetaModel, choose, fit_candidate, is_prob, load_model
from distrib.stacking.tables import SHOW, STAGE1, feature_columns, keys_text, load_experts, load_stage1

log = logging.getLogger(__name__)


def group_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedGroupKFold splits, each checked so that no group is on both sides."""
    n_groups = len(pd.unique(groups))
    if n_groups < n_splits:
        raise DataError(f"{n_groups} groups cannot fill {n_splits} meta-CV folds; lower stack.folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = list(splitter.split(np.zeros(len(y)), y, groups))
    for k, (tr, te) in enumerate(folds):
        shared = set(groups[tr]) & set(groups[te])
        if shared:
            raise DistribError(f"meta-CV fold {k} has group(s) on both sides: {keys_text(shared)}")
    return folds


def cross_validate(
    X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, folds, cfg: StackConfig, kind: str = "lightgbm"
) -> dict:
    """Out-of-fold meta predictions and per-fold AUC; each row is scored once, by a model that never saw it."""
    pred = np.full(len(y), np.nan)
    aucs, iters = [], []
    for tr, te in folds:
        model = fit_candidate(kind, X.iloc[tr], y[tr], groups[tr], cfg, group_folds)
        pred[te] = model.predict(X.iloc[te])
        aucs.append(float(roc_auc_score(y[te], pred[te])))
        iters.append(model.params.get("n_estimators"))
    out = {
        "pred": pred,
        "auc_mean": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "auc_pooled": float(roc_auc_score(y, pred)),
        "per_fold": aucs,
        "n_features": X.shape[1],
    }
    return out | ({"best_iterations": iters} if kind == "lightgbm" else {})


def _ablation_sets(cfg: StackConfig, experts: list[dict]) -> tuple[dict[str, list[str]], str]:
    """Feature sets scored with the same folds, and the name of the configured one among them."""
    has_recon = any(e["has_recon"] for e in experts)
    sets = {"prob": ["prob"], "prob+emb": ["prob", "emb"]}
    if has_recon:
        sets["prob+emb+recon"] = ["prob", "emb", "recon"]
    chosen = [s for s in ("prob", "emb", "recon", "stage1") if s in cfg.features and (s != "recon" or has_recon)]
    configured = "+".join(chosen)
    sets.setdefault(configured, chosen)
    return sets, configured


def _candidate_columns(kind: str, features: list[str], best_col: str) -> list[str]:
    """What each candidate reads: the best expert's probability, every probability, or every feature."""
    if kind == "best_expert":
        return [best_col]
    return [c for c in features if is_prob(c)] if kind == "weighted" else features


def _per_fold(y, p, folds) -> dict:
    per = [float(roc_auc_score(y[te], p[te])) for _, te in folds]
    return {
        "auc_mean": float(np.mean(per)),
        "auc_std": float(np.std(per)),
        "auc_pooled": float(roc_auc_score(y, p)),
        "per_fold": per,
        "n_features": 1,
    }


def _leaderboard(cand_runs: dict[str, dict]) -> dict[str, dict]:
    """Each candidate's CV summary plus its paired per-fold differences from the best expert."""
    base = np.asarray(cand_runs["best_expert"]["per_fold"])
    out = {}
    for k, r in cand_runs.items():
        diff = np.asarray(r["per_fold"]) - base
        out[k] = {
            **{m: v for m, v in r.items() if m != "pred"},
            "diff_vs_best_expert": diff.tolist(),
            "diff_mean": float(diff.mean()),
            "folds_above_best_expert": int((diff > 0).sum()),
        }
    return out


def fit_stack(
    oof_paths: list[str | Path], out_dir: str | Path, cfg: StackConfig, stage1: list[str | Path] | None = None
) -> dict:
    """Candidates and ablation on one set of grouped meta folds, the chosen model refit on every OOF row.

    Writes meta_model.json (+ .txt for LightGBM), meta_features.json, stack_results.json,
    meta_predictions.parquet and stack_ablation.png; returns stack_results.
    """
    from distrib.plots import plot_bars

    if "stage1" in cfg.features and not stage1:
        raise DataError(
            "stack.features includes 'stage1' but no --stage1 file was given; pass key,prob stage-1 "
            "predictions (out-of-fold for training rows) or drop 'stage1' from stack.features"
        )
    out = Path(out_dir)
    table, experts = load_experts(oof_paths)
    stage1_source = None
    if stage1 and "stage1" in cfg.features:
        table[STAGE1], stage1_source = load_stage1(stage1, table["key"])
    elif stage1:
        log.info("stack: --stage1 given but 'stage1' is not in stack.features; it is not used")
    features = feature_columns(experts, cfg.features)
    if "recon" in cfg.features and not any(e["has_recon"] for e in experts):
        log.info("stack: note: 'recon' requested but no expert has recon_error; using the other feature sets")
    if not features:
        raise DataError(f"stack.features={cfg.features} selects no column for experts {[e['name'] for e in experts]}")
    oof = table[table["split"] == "oof"].reset_index(drop=True)
    if oof.empty:
        raise DataError(f"no rows with split == 'oof' in {[e['path'] for e in experts]}; stacking needs OOF rows")
    y, groups = oof["label"].to_numpy().astype(int), oof["group"].astype(str).to_numpy()
    if len(classes := np.unique(y)) < 2:
        raise DataError(
            f"the OOF rows of {[e['path'] for e in experts]} all have label {classes.tolist()}; a meta-model "
            "needs both classes: rebuild the OOF tables from fold runs whose train split holds both labels"
        )
    folds = group_folds(y, groups, cfg.folds, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs passed their checks

    ablation = {f"expert:{e['name']}": _per_fold(y, oof[f"{e['name']}__prob"].to_numpy(), folds) for e in experts}
    if STAGE1 in oof:
        ablation["stage1 alone"] = _per_fold(y, oof[STAGE1].to_numpy(), folds)
    best_expert = max((k for k in ablation if k.startswith("expert:")), key=lambda k: ablation[k]["auc_mean"])
    best_col = f"{best_expert.split(':', 1)[1]}__prob"
    sets, configured = _ablation_sets(cfg, experts)
    runs = {}
    for name, chosen in sets.items():
        runs[name] = cross_validate(oof[feature_columns(experts, chosen)], y, groups, folds, cfg)
        ablation[name] = {k: v for k, v in runs[name].items() if k != "pred"}

    cand_runs = {
        "best_expert": {"pred": oof[best_col].to_numpy(), **ablation[best_expert]},
        "lightgbm": runs[configured],
    }
    skipped = {}
    for kind in ("weighted", "logistic"):
        if cols := _candidate_columns(kind, features, best_col):
            try:
                cand_runs[kind] = cross_validate(oof[cols], y, groups, folds, cfg, kind=kind)
            except DataError as err:  # e.g. too few groups for the inner C search: leave it off the board
                log.warning(f"stack: candidate {kind} skipped: {err}")
                skipped[kind] = str(err)
    candidates = _leaderboard(cand_runs)
    if cfg.group_agg != "none":  # the same OOF predictions scored per group, next to per sample
        preds_of = {
            **{k: oof[f"{k.split(':', 1)[1]}__prob"].to_numpy() for k in ablation if k.startswith("expert:")},
            **({"stage1 alone": oof[STAGE1].to_numpy()} if STAGE1 in oof else {}),
            **{k: r["pred"] for k, r in runs.items()},
        }
        for board, source in ((ablation, preds_of), (candidates, {k: r["pred"] for k, r in cand_runs.items()})):
            for name, pred in source.items():
                board[name]["group"] = group_metrics(groups, y, pred, cfg.group_agg)
    auto_pick = choose(candidates, cfg.tie)
    kind = auto_pick if cfg.meta == "auto" else cfg.meta
    if kind not in cand_runs:
        raise DataError(
            skipped.get(kind) or f"stack.meta={kind} has no input columns with stack.features={cfg.features}"
        )
    cv_main = cand_runs[kind]
    cols = _candidate_columns(kind, features, best_col)
    n_final = int(np.median(cv_main["best_iterations"])) if kind == "lightgbm" else None
    model = fit_candidate(kind, oof[cols], y, groups, cfg, group_folds, n_estimators=max(n_final or 0, 1))
    spec = model.save(out)

    meta_fold = np.full(len(oof), -1)
    for k, (_, te) in enumerate(folds):
        meta_fold[te] = k
    rest = table[table["split"] != "oof"].reset_index(drop=True)
    expert_cols = {f"prob_{e['name']}": f"{e['name']}__prob" for e in experts}
    keep = ["key", "group", "label", "split"]
    preds = pd.concat(
        [
            oof[keep].assign(prob=cv_main["pred"], meta_fold=meta_fold, **{k: oof[v] for k, v in expert_cols.items()}),
            rest[keep].assign(
                prob=model.predict(rest) if len(rest) else np.zeros(0),
                meta_fold=-1,
                **{k: rest[v] for k, v in expert_cols.items()},
            ),
        ],
        ignore_index=True,
    )
    preds.to_parquet(out / "meta_predictions.parquet", index=False)

    split_metrics = {
        split: versus_best_expert(preds[preds["split"] == split], split, best_expert, cfg)
        for split in sorted(rest["split"].unique(), key=lambda v: (v != "val", v))
    }
    split_metrics = {k: v for k, v in split_metrics.items() if v}
    refit_splits = compare_refit(experts, model, stage1, split_metrics, best_expert, cfg)  # embed.inference=refit
    meta_info = {
        "experts": experts,
        "features": cols,
        "feature_sets": list(cfg.features),
        "meta": kind,
        "stage1_source": stage1_source,
        "config": dataclasses.asdict(cfg),
        "n_estimators": n_final,
        "model": {k: v for k, v in spec.items() if k != "params"},
        "prediction": "stack.load_meta + stack.predict_meta -> P(label=1)",
    }
    results = {
        "n_oof": int(len(oof)),
        "n_groups": int(len(pd.unique(groups))),
        "folds": cfg.folds,
        "meta": kind,
        "meta_setting": cfg.meta,
        "auto_pick": auto_pick,
        "tie": cfg.tie,
        "features": configured,
        "n_features": len(cols),
        "stage1_source": stage1_source,
        "cv": {k: v for k, v in cv_main.items() if k != "pred"},
        "cv_oof_metrics": binary_metrics(y, cv_main["pred"]),
        "best_expert": best_expert,
        "candidates": candidates,
        "candidates_skipped": skipped,
        "ablation": ablation,
        "final_n_estimators": n_final,
        "splits": split_metrics,
        "refit_splits": refit_splits,
    }
    for name, obj in (("meta_features.json", meta_info), ("stack_results.json", results)):
        write_json(out / name, obj)
    bars = {**{f"meta:{k}": v for k, v in candidates.items()}, **ablation}
    plot_bars(
        {k: v["auc_mean"] for k, v in bars.items()},
        out / "stack_ablation.png",
        "Meta-CV AUC by candidate and feature set",
        "AUC (mean over meta folds)",
        errors=[v["auc_std"] for v in bars.values()],
    )
    return results


def load_meta(stack_dir: str | Path) -> tuple[MetaModel, dict]:
    """The saved meta-model (any candidate kind) and its meta_features.json (input columns, experts)."""
    d = Path(stack_dir)
    for name in ("meta_features.json",):
        if not (d / name).is_file():
            raise DataError(f"{d / name} not found; run 'distrib stack --out {d}' first")
    if not (d / "meta_model.json").is_file() and not (d / "meta_model.txt").is_file():
        raise DataError(f"{d / 'meta_model.json'} not found; run 'distrib stack --out {d}' first")
    info = json.loads((d / "meta_features.json").read_text())
    return load_model(d, info["features"]), info


def predict_meta(model: MetaModel, meta: dict, frame: pd.DataFrame) -> np.ndarray:
    """P(label=1) from the meta-model for rows holding the columns listed in ``meta['features']``."""
    missing = [c for c in meta["features"] if c not in frame.columns]
    if missing:
        hint = " (stage1__prob: the cascade adds stage 1's probability)" if STAGE1 in missing else ""
        raise DataError(
            f"meta-model features missing from the input: {missing[:SHOW]}{hint}; the experts given to "
            f"the cascade must match meta_features.json ({[e['name'] for e in meta['experts']]})"
        )
    return model.predict(frame)
