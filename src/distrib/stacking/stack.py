"""LightGBM meta-learner over the experts' OOF probabilities, aligned embeddings and reconstruction error.

    distrib stack --oof runs/cnn/oof_embeddings.parquet runs/genconvit/oof_embeddings.parquet --out runs/stack

Honest evaluation: the meta-model gets its OWN grouped K-fold CV (StratifiedGroupKFold) on the OOF
rows (split == 'oof'); no group is ever on both sides of a fold (checked, not assumed); early
stopping uses an inner grouped split of the training part only, so no score comes from a row the
model trained or stopped on. The same folds score the ablation (each expert alone, probabilities
only, + embeddings, + reconstruction error). The final model is fit on every OOF row with the
median CV best iteration and then applied to val/test.
"""
from __future__ import annotations

import logging
import dataclasses
import json
import re
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from distrib.atomic import write_json
from distrib.config import StackConfig
from distrib.errors import DataError, DistribError
from distrib.metrics import binary_metrics

log = logging.getLogger(__name__)

SHOW = 10  # keys named in an error message
REQUIRED = ("key", "group", "label", "split", "model", "prob")


def _emb_cols(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if re.fullmatch(r"emb_\d+", c))


def _keys(values) -> str:
    values = sorted(map(str, values))
    more = f" (+{len(values) - SHOW} more)" if len(values) > SHOW else ""
    return ", ".join(values[:SHOW]) + more


def load_experts(paths: list[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """Read one oof_embeddings.parquet per expert and join them on ``key`` into one wide table.

    Columns of the result: key, group, label, split, and per expert ``{name}__prob``,
    ``{name}__emb_NNN``, ``{name}__recon_error``. A key missing from any expert is an error naming it.
    """
    base, experts = None, []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"OOF table not found: {path} (run 'distrib embed' or the sweep with tune.embed_best)")
        df = pd.read_parquet(path)
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; oof_embeddings.parquet needs {list(REQUIRED)} + emb_*")
        if df["key"].duplicated().any():
            raise DataError(f"{path}: duplicated keys {_keys(df.loc[df['key'].duplicated(), 'key'])}; "
                            "each sample must appear exactly once (re-run the OOF merge)")
        name = re.sub(r"[^A-Za-z0-9_]", "_", str(df["model"].iloc[0]))
        if any(e["name"] == name for e in experts):
            name = f"{name}_{len(experts)}"
        embs = _emb_cols(df)
        has_recon = "recon_error" in df.columns
        experts.append({"name": name, "path": str(path), "model": str(df["model"].iloc[0]),
                        "emb_dim": len(embs), "has_recon": has_recon})
        cols = {"prob": f"{name}__prob", **{c: f"{name}__{c}" for c in embs}}
        if has_recon:
            cols["recon_error"] = f"{name}__recon_error"
        part = df[["key", "group", "label", "split", *cols]].rename(columns=cols)
        if base is None:
            base = part
            continue
        only_new = set(part["key"]) - set(base["key"])
        only_old = set(base["key"]) - set(part["key"])
        if only_new or only_old:
            raise DataError(f"experts disagree on samples: {len(only_old)} key(s) missing from {path} "
                            f"({_keys(only_old)}) and {len(only_new)} key(s) only in it ({_keys(only_new)}); "
                            "every expert must be embedded on the same shards")
        merged = base.merge(part, on="key", suffixes=("", "__new"))
        for col in ("group", "label", "split"):
            bad = merged[col].astype(str) != merged[f"{col}__new"].astype(str)
            if bad.any():
                raise DataError(f"{path} disagrees with {experts[0]['path']} on '{col}' for keys "
                                f"{_keys(merged.loc[bad, 'key'])}; the experts were built from different shards")
        base = merged.drop(columns=[f"{c}__new" for c in ("group", "label", "split")])
    return base.reset_index(drop=True), experts


def feature_columns(experts: list[dict], sets: list[str]) -> list[str]:
    """Feature names for the feature sets ('prob', 'emb', 'recon'), in a fixed order."""
    cols = []
    for e in experts:
        if "prob" in sets:
            cols.append(f"{e['name']}__prob")
        if "emb" in sets:
            cols += [f"{e['name']}__emb_{i:03d}" for i in range(e["emb_dim"])]
        if "recon" in sets and e["has_recon"]:
            cols.append(f"{e['name']}__recon_error")
    return cols


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
            raise DistribError(f"meta-CV fold {k} has group(s) on both sides: {_keys(shared)}")
    return folds


def _classifier(cfg: StackConfig, n_estimators: int | None = None) -> lgb.LGBMClassifier:
    return lgb.LGBMClassifier(n_estimators=n_estimators or cfg.n_estimators, learning_rate=cfg.learning_rate,
                              num_leaves=cfg.num_leaves, min_child_samples=cfg.min_child_samples,
                              n_jobs=cfg.n_jobs, random_state=cfg.seed, deterministic=True,
                              force_row_wise=True, verbose=-1)


def _fit_one(X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, cfg: StackConfig) -> tuple[lgb.LGBMClassifier, int]:
    """Fit on (X, y); early stopping watches an inner grouped split of these rows only."""
    if cfg.early_stopping_rounds == 0:
        return _classifier(cfg).fit(X, y), cfg.n_estimators
    inner_tr, inner_es = group_folds(y, groups, min(4, len(pd.unique(groups))), cfg.seed + 1)[0]
    model = _classifier(cfg).fit(X.iloc[inner_tr], y[inner_tr], eval_X=(X.iloc[inner_es],), eval_y=(y[inner_es],),
                                 eval_metric="auc", callbacks=[lgb.early_stopping(cfg.early_stopping_rounds,
                                                                                  verbose=False)])
    return model, int(model.best_iteration_ or cfg.n_estimators)


def cross_validate(X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, folds, cfg: StackConfig) -> dict:
    """Out-of-fold meta predictions and per-fold AUC; each row is scored once, by a model that never saw it."""
    pred = np.full(len(y), np.nan)
    aucs, iters = [], []
    for tr, te in folds:
        model, best = _fit_one(X.iloc[tr], y[tr], groups[tr], cfg)
        pred[te] = model.predict_proba(X.iloc[te], num_iteration=best)[:, 1]
        aucs.append(float(roc_auc_score(y[te], pred[te])))
        iters.append(best)
    return {"pred": pred, "auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
            "auc_pooled": float(roc_auc_score(y, pred)), "per_fold": aucs, "best_iterations": iters,
            "n_features": X.shape[1]}


def _ablation_sets(cfg: StackConfig, experts: list[dict]) -> tuple[dict[str, list[str]], str]:
    """Feature sets scored with the same folds, and the name of the configured one among them."""
    has_recon = any(e["has_recon"] for e in experts)
    sets = {"prob": ["prob"], "prob+emb": ["prob", "emb"]}
    if has_recon:
        sets["prob+emb+recon"] = ["prob", "emb", "recon"]
    chosen = [s for s in ("prob", "emb", "recon") if s in cfg.features and (s != "recon" or has_recon)]
    configured = "+".join(chosen)
    sets.setdefault(configured, chosen)
    return sets, configured


def fit_stack(oof_paths: list[str | Path], out_dir: str | Path, cfg: StackConfig) -> dict:
    """Meta-CV, ablation, final fit; writes meta_model.txt, meta_features.json, stack_results.json, predictions."""
    from distrib.plots import plot_bars

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, experts = load_experts(oof_paths)
    features = feature_columns(experts, cfg.features)
    if "recon" in cfg.features and not any(e["has_recon"] for e in experts):
        log.info("stack: note: 'recon' requested but no expert has recon_error; using the other feature sets")
    if not features:
        raise DataError(f"stack.features={cfg.features} selects no column for experts {[e['name'] for e in experts]}")
    oof = table[table["split"] == "oof"].reset_index(drop=True)
    if oof.empty:
        raise DataError(f"no rows with split == 'oof' in {[e['path'] for e in experts]}; stacking needs OOF rows")
    y, groups = oof["label"].to_numpy().astype(int), oof["group"].astype(str).to_numpy()
    folds = group_folds(y, groups, cfg.folds, cfg.seed)

    ablation = {}
    for e in experts:  # each expert alone: its own probability, scored on the same folds
        p = oof[f"{e['name']}__prob"].to_numpy()
        per = [float(roc_auc_score(y[te], p[te])) for _, te in folds]
        ablation[f"expert:{e['name']}"] = {"auc_mean": float(np.mean(per)), "auc_std": float(np.std(per)),
                                           "auc_pooled": float(roc_auc_score(y, p)), "per_fold": per, "n_features": 1}
    sets, configured = _ablation_sets(cfg, experts)
    for name, chosen in sets.items():
        res = cross_validate(oof[feature_columns(experts, chosen)], y, groups, folds, cfg)
        if name == configured:
            cv_main = res
        ablation[name] = {k: v for k, v in res.items() if k != "pred"}

    n_final = int(np.median(cv_main["best_iterations"]))
    final = _classifier(cfg, n_estimators=max(n_final, 1)).fit(oof[features], y)
    booster = final.booster_
    booster.save_model(str(out / "meta_model.txt"))

    meta_fold = np.full(len(oof), -1)
    for k, (_, te) in enumerate(folds):
        meta_fold[te] = k
    rest = table[table["split"] != "oof"].reset_index(drop=True)
    pred_rest = booster.predict(rest[features]) if len(rest) else np.zeros(0)
    expert_cols = {f"prob_{e['name']}": f"{e['name']}__prob" for e in experts}
    preds = pd.concat([
        oof[["key", "group", "label", "split"]].assign(prob=cv_main["pred"], meta_fold=meta_fold,
                                                       **{k: oof[v] for k, v in expert_cols.items()}),
        rest[["key", "group", "label", "split"]].assign(prob=pred_rest, meta_fold=-1,
                                                        **{k: rest[v] for k, v in expert_cols.items()}),
    ], ignore_index=True)
    preds.to_parquet(out / "meta_predictions.parquet", index=False)

    split_metrics = {}
    for split in sorted(rest["split"].unique()):
        part = preds[preds["split"] == split]
        if part["label"].nunique() == 2:
            split_metrics[split] = {"meta_auc": float(roc_auc_score(part["label"], part["prob"])),
                                    **{f"{k}_auc": float(roc_auc_score(part["label"], part[k])) for k in expert_cols}}
    best_expert = max((k for k in ablation if k.startswith("expert:")), key=lambda k: ablation[k]["auc_mean"])
    meta_info = {"experts": experts, "features": features, "feature_sets": list(cfg.features),
                 "config": dataclasses.asdict(cfg), "n_estimators": n_final, "prediction": "booster.predict -> P(label=1)"}
    results = {"n_oof": int(len(oof)), "n_groups": int(len(pd.unique(groups))), "folds": cfg.folds,
               "features": configured, "n_features": len(features),
               "cv": {k: v for k, v in cv_main.items() if k != "pred"},
               "cv_oof_metrics": binary_metrics(y, cv_main["pred"]),
               "best_expert": best_expert, "ablation": ablation, "final_n_estimators": n_final,
               "splits": split_metrics}
    for name, obj in (("meta_features.json", meta_info), ("stack_results.json", results)):
        write_json(out / name, obj)
    plot_bars({k: v["auc_mean"] for k, v in ablation.items()}, out / "stack_ablation.png",
              "Meta-CV AUC by feature set", "AUC (mean over meta folds)",
              errors=[v["auc_std"] for v in ablation.values()])
    return results


def load_meta(stack_dir: str | Path) -> tuple[lgb.Booster, dict]:
    """The saved meta-model and its feature list (names/order the model was trained with)."""
    d = Path(stack_dir)
    for name in ("meta_model.txt", "meta_features.json"):
        if not (d / name).is_file():
            raise DataError(f"{d / name} not found; run 'distrib stack --out {d}' first")
    return lgb.Booster(model_file=str(d / "meta_model.txt")), json.loads((d / "meta_features.json").read_text())


def predict_meta(booster: lgb.Booster, meta: dict, frame: pd.DataFrame) -> np.ndarray:
    """P(label=1) from the meta-model for rows holding the columns listed in ``meta['features']``."""
    missing = [c for c in meta["features"] if c not in frame.columns]
    if missing:
        raise DataError(f"meta-model features missing from the input: {missing[:SHOW]}; the experts given to the "
                        f"cascade must match meta_features.json ({[e['name'] for e in meta['experts']]})")
    return booster.predict(frame[meta["features"]])
