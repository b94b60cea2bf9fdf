"""Stacking with real LightGBM on OOF tables with a planted signal: meta-CV beats each expert, groups never leak."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from distrib.cli import main as cli_main
from distrib.config import StackConfig
from distrib.errors import DataError
from distrib.stacking.stack import cross_validate, group_folds, load_experts, load_meta, predict_meta

DIM = 8


def _tables(tmp_path, n_groups=160, per_group=4, seed=0):
    """Two experts, each informative on one manipulation type only; the type is visible in A's embedding.

    Stacking can learn "trust A on type 0, B on type 1", so the meta-model must beat either expert.
    """
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    kind = rng.integers(0, 2, n_groups)[g]  # manipulation type, shared within a source photo
    y = rng.integers(0, 2, len(g))
    split = np.where(g < n_groups * 0.7, "oof", np.where(g < n_groups * 0.85, "val", "test"))
    base = pd.DataFrame(
        {
            "key": [f"k{i:05d}" for i in range(len(g))],
            "group": [f"photo{v}" for v in g],
            "label": y,
            "fold": g % 3,
            "split": split,
        }
    )
    paths = []
    for name, informative in (("cnn", 0), ("genconvit_ed", 1)):
        logit = np.where(kind == informative, 3.0 * (2 * y - 1), 0.0) + rng.normal(0, 1.0, len(g))
        df = base.assign(model=name, prob=1 / (1 + np.exp(-logit)))
        emb = rng.normal(0, 1, (len(g), DIM))
        if name == "cnn":
            emb[:, 0] += 2.0 * kind
        for j in range(DIM):
            df[f"emb_{j:03d}"] = emb[:, j]
        if name == "genconvit_ed":
            df["recon_error"] = rng.gamma(2.0, 1.0, len(g)) + 0.5 * y * (kind == 1)
        path = tmp_path / f"{name}.parquet"
        df.to_parquet(path, index=False)
        paths.append(path)
    return paths


CFG_OVERRIDES = [
    "stack.folds=3",
    "stack.n_estimators=150",
    "stack.learning_rate=0.1",
    "stack.n_jobs=1",
    "stack.early_stopping_rounds=20",
    "stack.min_child_samples=10",
]


def test_meta_cv_beats_each_expert_and_keeps_groups_whole(tmp_path, capsys):
    paths = _tables(tmp_path)
    out = tmp_path / "stack"
    assert cli_main(["stack", "--oof", *map(str, paths), "--out", str(out), *CFG_OVERRIDES]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((out / "stack_results.json").read_text())
    abl = results["ablation"]
    meta = results["cv"]["auc_mean"]
    for expert in ("expert:cnn", "expert:genconvit_ed"):
        assert meta > abl[expert]["auc_mean"] + 0.05, (meta, abl[expert])
    assert set(abl) >= {"prob", "prob+emb", "prob+emb+recon"}
    assert results["features"] == "prob+emb+recon" and res["cv_auc_mean"] == meta

    preds = pd.read_parquet(out / "meta_predictions.parquet")
    oof = preds[preds["split"] == "oof"]
    assert oof["key"].is_unique and len(oof) == results["n_oof"]  # each OOF row scored exactly once
    assert (oof.groupby("group")["meta_fold"].nunique() == 1).all()  # a group never spans two meta folds
    assert oof["meta_fold"].min() == 0 and set(preds.loc[preds["split"] != "oof", "meta_fold"]) == {-1}

    booster, info = load_meta(out)
    assert info["features"][0] == "cnn__prob" and info["meta"] == results["meta"] == res["meta"]
    wide, _ = load_experts(paths)
    test = wide[wide["split"] == "test"]
    np.testing.assert_allclose(
        predict_meta(booster, info, test), preds.set_index("key").loc[test["key"], "prob"].to_numpy(), rtol=1e-6
    )
    assert (out / "stack_ablation.png").stat().st_size > 1000


def test_group_folds_disjoint_and_cv_reproducible(tmp_path):
    paths = _tables(tmp_path, n_groups=60)
    wide, experts = load_experts(paths)
    oof = wide[wide["split"] == "oof"].reset_index(drop=True)
    y, groups = oof["label"].to_numpy(), oof["group"].to_numpy()
    folds = group_folds(y, groups, 3, seed=0)
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen.tolist()) == list(range(len(oof)))  # every row in exactly one test fold
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
    cfg = StackConfig(folds=3, n_estimators=40, n_jobs=1, early_stopping_rounds=10, min_child_samples=5)
    X = oof[["cnn__prob", "genconvit_ed__prob"]]
    a, b = cross_validate(X, y, groups, folds, cfg), cross_validate(X, y, groups, folds, cfg)
    np.testing.assert_array_equal(a["pred"], b["pred"])
    with pytest.raises(DataError, match="groups cannot fill"):
        group_folds(y[:8], groups[:8], 3, seed=0)


def test_missing_key_is_named(tmp_path):
    paths = _tables(tmp_path, n_groups=20)
    df = pd.read_parquet(paths[1])
    df.iloc[1:].to_parquet(paths[1], index=False)
    with pytest.raises(DataError, match=r"1 key\(s\) missing from .*genconvit_ed.parquet \(k00000\)"):
        load_experts(paths)


def test_group_agg_scores_ablation_candidates_and_splits_per_group(tmp_path):
    """stack.group_agg=max: every ablation entry, candidate and val/test split also carries group AUC/AP,
    equal to sklearn on each group's max OOF probability."""
    from sklearn.metrics import roc_auc_score

    from distrib.config import load_config
    from distrib.stacking.stack import fit_stack

    paths = _tables(tmp_path, n_groups=80)
    cfg = load_config(None, [*CFG_OVERRIDES, "stack.group_agg=max", "stack.bootstrap=50"]).stack
    res = fit_stack(paths, tmp_path / "stack", cfg)
    preds = pd.read_parquet(tmp_path / "stack" / "meta_predictions.parquet")
    oof = preds[preds["split"] == "oof"]
    for name in ("expert:cnn", "expert:genconvit_ed", "prob", "prob+emb"):
        assert res["ablation"][name]["group"]["agg"] == "max" and res["ablation"][name]["group"]["n_groups"] > 0
    units = oof.groupby(["group", "label"])
    want = roc_auc_score(units["label"].first(), units["prob_cnn"].max())
    assert res["ablation"]["expert:cnn"]["group"]["auc"] == pytest.approx(want, abs=1e-12)
    chosen = res["candidates"][res["meta"]]["group"]
    assert chosen["auc"] == pytest.approx(roc_auc_score(units["label"].first(), units["prob"].max()), abs=1e-12)
    test = preds[preds["split"] == "test"].groupby(["group", "label"])
    assert res["splits"]["test"]["group"]["prob"]["auc"] == pytest.approx(
        roc_auc_score(test["label"].first(), test["prob"].max()), abs=1e-12
    )
    with pytest.raises(Exception, match="stack.group_agg"):
        load_config(None, ["stack.group_agg=median"])


def test_one_class_oof_tables_are_a_clear_error_and_write_nothing(tmp_path):
    paths = _tables(tmp_path)
    for path in paths:
        df = pd.read_parquet(path)
        df.assign(label=1).to_parquet(path, index=False)
    out = tmp_path / "stack"
    code = cli_main(["stack", "--oof", *map(str, paths), "--out", str(out)])
    assert code == 2
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(DataError, match=r"all have label \[1\].*needs both classes"):
        from distrib.stacking.stack import fit_stack

        fit_stack(paths, out, StackConfig())
