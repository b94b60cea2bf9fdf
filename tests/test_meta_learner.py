"""Stage 3 must earn its place: candidate meta-learners chosen by grouped meta-CV, never below the best expert.

Real LightGBM / sklearn on OOF tables built here: a complementary task (two experts, each good on a
different half of the source groups), a redundant one (a strong and a weak expert with correlated
errors and noise embeddings), and the bad stack inputs of issue 15.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from distrib.cli import main as cli_main
from distrib.config import StackConfig
from distrib.errors import DataError
from distrib.stacking.meta import caruana, fit_weighted, logits
from distrib.stacking.stack import fit_stack, load_experts, load_meta, predict_meta
from distrib.stacking.thresholds import auc_difference, weighted_auc

DIM = 6
CFG = dict(
    folds=4, n_estimators=120, learning_rate=0.1, n_jobs=1, early_stopping_rounds=20, logistic_cs=6, bootstrap=300
)


def _write(tmp_path, base, experts: dict[str, np.ndarray], rng, emb_signal=None):
    """One oof_embeddings.parquet per expert: its probability, DIM noise embedding columns (+ optional signal)."""
    paths = []
    for name, logit in experts.items():
        df = base.assign(model=name, prob=1 / (1 + np.exp(-logit)))
        emb = rng.normal(0, 1, (len(base), DIM))
        if emb_signal is not None:
            emb[:, 0] += emb_signal
        for j in range(DIM):
            df[f"emb_{j:03d}"] = emb[:, j]
        paths.append(tmp_path / f"{name}.parquet")
        df.to_parquet(paths[-1], index=False)
    return paths


def _base(n_groups, per_group, rng):
    g = np.repeat(np.arange(n_groups), per_group)
    y = rng.integers(0, 2, len(g))
    split = np.where(g < n_groups * 0.7, "oof", np.where(g < n_groups * 0.85, "val", "test"))
    base = pd.DataFrame(
        {
            "key": [f"k{i:05d}" for i in range(len(g))],
            "group": [f"src{v}" for v in g],
            "label": y,
            "fold": g % 3,
            "split": split,
        }
    )
    return base, g, y


def complementary(tmp_path, seed=0, n_groups=200, per_group=4):
    """Expert A sees through the manipulation on even groups only, expert B on odd groups only."""
    rng = np.random.default_rng(seed)
    base, g, y = _base(n_groups, per_group, rng)
    half = g % 2
    sign = 2 * y - 1
    experts = {
        "cnn": np.where(half == 0, 2.5 * sign, 0.0) + rng.normal(0, 1, len(g)),
        "vae": np.where(half == 1, 2.5 * sign, 0.0) + rng.normal(0, 1, len(g)),
    }
    return _write(tmp_path, base, experts, rng)


def redundant(tmp_path, seed=1, n_groups=200, per_group=4):
    """A strong and a weak expert sharing most of their error (a per-group nuisance), noise embeddings."""
    rng = np.random.default_rng(seed)
    base, g, y = _base(n_groups, per_group, rng)
    nuisance = rng.normal(0, 1, n_groups)[g]
    experts = {
        "strong": 1.6 * (2 * y - 1) + nuisance + rng.normal(0, 0.8, len(g)),
        "weak": 0.8 * (2 * y - 1) + nuisance + rng.normal(0, 1.2, len(g)),
    }
    return _write(tmp_path, base, experts, rng)


def _leaderboard(res) -> str:
    rows = [
        f"{k:<12} {v['auc_mean']:.4f} +- {v['auc_std']:.4f}  diff {v['diff_mean']:+.4f}"
        for k, v in res["candidates"].items()
    ]
    return f"chosen {res['meta']}\n" + "\n".join(rows)


def test_complementary_task_meta_clearly_above_both_experts(tmp_path):
    res = fit_stack(complementary(tmp_path), tmp_path / "stack", StackConfig(**CFG))
    print(_leaderboard(res))
    cand, abl = res["candidates"], res["ablation"]
    chosen = res["cv"]["auc_mean"]
    assert chosen == cand[res["meta"]]["auc_mean"] >= max(c["auc_mean"] for c in cand.values()) - res["tie"]
    for expert in ("expert:cnn", "expert:vae"):
        assert chosen > abl[expert]["auc_mean"] + 0.05, (res["meta"], chosen, abl[expert])
    assert res["meta"] != "best_expert" and cand[res["meta"]]["folds_above_best_expert"] == CFG["folds"]
    # the honest comparison on val/test: difference with a grouped-bootstrap CI, and one plain line
    for split in ("val", "test"):
        v = res["splits"][split]["vs_best_expert"]
        assert v["diff_ci95"][0] <= v["diff"] <= v["diff_ci95"][1] and v["diff"] > 0
        assert v["verdict"].startswith(f"On {split} the meta-model beats the best expert")


def test_second_dataset_chosen_cv_never_below_best_expert(tmp_path):
    res = fit_stack(redundant(tmp_path), tmp_path / "stack", StackConfig(**CFG))
    print(_leaderboard(res))
    best = res["candidates"]["best_expert"]["auc_mean"]
    assert res["cv"]["auc_mean"] >= best
    assert res["best_expert"] == "expert:strong"
    # whatever was chosen, the saved model reloads and reproduces its val/test predictions
    model, info = load_meta(tmp_path / "stack")
    assert model.kind == res["meta"] and info["features"] == model.columns
    wide, _ = load_experts([tmp_path / "strong.parquet", tmp_path / "weak.parquet"])
    rest = wide[wide["split"] != "oof"]
    saved = pd.read_parquet(tmp_path / "stack" / "meta_predictions.parquet").set_index("key")
    np.testing.assert_allclose(predict_meta(model, info, rest), saved.loc[rest["key"], "prob"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["lightgbm", "logistic", "weighted", "best_expert"])
def test_every_candidate_saves_loads_and_predicts(tmp_path, kind):
    paths = complementary(tmp_path, n_groups=80)
    res = fit_stack(paths, tmp_path / kind, StackConfig(**{**CFG, "meta": kind, "folds": 3, "bootstrap": 0}))
    assert res["meta"] == kind and res["auto_pick"] in res["candidates"]
    model, info = load_meta(tmp_path / kind)
    assert model.kind == kind and (tmp_path / kind / "meta_model.txt").exists() == (kind == "lightgbm")
    spec = json.loads((tmp_path / kind / "meta_model.json").read_text())  # JSON, no pickle
    assert spec["kind"] == kind
    wide, _ = load_experts(paths)
    test = wide[wide["split"] == "test"]
    saved = pd.read_parquet(tmp_path / kind / "meta_predictions.parquet").set_index("key")
    np.testing.assert_allclose(predict_meta(model, info, test), saved.loc[test["key"], "prob"], rtol=1e-6)
    if kind == "lightgbm":  # a stack dir from before meta_model.json (LightGBM txt only) still loads
        (tmp_path / kind / "meta_model.json").unlink()
        old, _ = load_meta(tmp_path / kind)
        np.testing.assert_allclose(predict_meta(old, info, test), saved.loc[test["key"], "prob"], rtol=1e-6)


def test_weighted_never_below_best_expert_on_its_fit_rows():
    for seed in range(12):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(60, 400))
        y = rng.integers(0, 2, n)
        sign = 2 * y - 1
        # 2-4 experts of mixed quality, one anti-informative, some ties from rounding
        cols = {
            f"e{j}": np.round(1 / (1 + np.exp(-(rng.normal(0, 1.5) * sign + rng.normal(0, 1, n)))), 2)
            for j in range(int(rng.integers(2, 5)))
        }
        X = pd.DataFrame({f"{k}__prob": v for k, v in cols.items()})
        model = fit_weighted(X, y, StackConfig(ensemble_size=int(rng.integers(1, 30))))
        w = np.asarray(model.params["weights"])
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        fit_auc = roc_auc_score(y, model.predict(X))
        best = max(roc_auc_score(y, X[c]) for c in X)
        assert fit_auc >= best - 1e-12, (seed, fit_auc, best, w)


def test_caruana_and_vectorized_auc_agree_with_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    W = rng.integers(0, 3, (4, 300))
    np.testing.assert_allclose(weighted_auc(y, s, W), [roc_auc_score(y, s, sample_weight=w) for w in W])
    P = logits(np.column_stack([1 / (1 + np.exp(-(y + rng.normal(0, 1, 300)))), rng.random(300)]))
    weights, traj = caruana(P, y, 10)
    assert weights[1] == 0 and traj[0] == pytest.approx(roc_auc_score(y, P[:, 0]))  # noise expert never picked
    cmp = auc_difference(y, s, s, np.arange(300) // 3, 50, seed=0)
    assert cmp["diff"] == 0 and cmp["diff_ci95"] == [0.0, 0.0]


def test_auto_picks_by_cv_not_by_test(tmp_path):
    paths = redundant(tmp_path, n_groups=120)
    cfg = StackConfig(**{**CFG, "folds": 3, "bootstrap": 0})
    a = fit_stack(paths, tmp_path / "a", cfg)
    for p in paths:  # flip every test label and scramble test probabilities: nothing the choice sees changes
        df = pd.read_parquet(p)
        test = df["split"] == "test"
        df.loc[test, "label"] = 1 - df.loc[test, "label"]
        df.loc[test, "prob"] = np.random.default_rng(0).random(int(test.sum()))
        df.to_parquet(p, index=False)
    b = fit_stack(paths, tmp_path / "b", cfg)
    assert a["meta"] == b["meta"] and a["candidates"] == b["candidates"]
    assert a["splits"]["test"] != b["splits"]["test"] and a["splits"]["val"] == b["splits"]["val"]
    top = max(c["auc_mean"] for c in a["candidates"].values())
    assert a["candidates"][a["meta"]]["auc_mean"] >= top - cfg.tie


def test_stage1_probability_is_a_feature(tmp_path):
    paths = complementary(tmp_path, n_groups=80)
    wide, _ = load_experts(paths)
    # stage 1 sees the odd groups too, a little: as a feature it helps the weighted/logistic candidates
    rng = np.random.default_rng(5)
    s1 = 1 / (1 + np.exp(-(1.0 * (2 * wide["label"] - 1) + rng.normal(0, 1, len(wide)))))
    s1_path = tmp_path / "stage1_oof.csv"
    pd.DataFrame({"key": wide["key"], "prob": s1}).to_csv(s1_path, index=False)
    cfg = StackConfig(**{**CFG, "folds": 3, "bootstrap": 0, "features": ["prob", "stage1"]})
    res = fit_stack(paths, tmp_path / "stack", cfg, stage1=[s1_path])
    assert res["stage1_source"] == [str(s1_path)] and "stage1 alone" in res["ablation"]
    assert (
        "stage1__prob" in json.loads((tmp_path / "stack" / "meta_features.json").read_text())["features"]
        or res["meta"] == "best_expert"
    )
    with pytest.raises(DataError, match="no --stage1 file"):
        fit_stack(paths, tmp_path / "x", cfg)
    pd.DataFrame({"key": wide["key"][1:], "prob": s1[1:]}).to_csv(s1_path, index=False)
    with pytest.raises(DataError, match=r"no probability for 1 sample\(s\) \(k00000\)"):
        fit_stack(paths, tmp_path / "x", cfg, stage1=[s1_path])


def _stack_err(capsys, tmp_path, *oof) -> str:
    assert cli_main(["stack", "--oof", *map(str, oof), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_stack_inputs_are_one_line_errors(tmp_path, capsys):
    paths = complementary(tmp_path, n_groups=40)
    df = pd.read_parquet(paths[0])
    nan = df.assign(prob=df["prob"].where(df.index != 3))
    nan.to_parquet(tmp_path / "nan.parquet", index=False)
    err = _stack_err(capsys, tmp_path, tmp_path / "nan.parquet", paths[1])
    assert "nan.parquet: 1 row(s) have no numeric 'prob' (keys k00003)" in err and "re-run" in err

    df.assign(prob=df["prob"] * 100).to_parquet(tmp_path / "pct.parquet", index=False)
    err = _stack_err(capsys, tmp_path, tmp_path / "pct.parquet", paths[1])
    assert "pct.parquet: 'prob' must be P(label=1) in [0, 1], found" in err and "divide a 0-100 score by 100" in err

    df.to_csv(tmp_path / "oof.csv", index=False)
    err = _stack_err(capsys, tmp_path, tmp_path / "oof.csv", paths[1])
    assert "oof.csv is not a readable parquet file" in err and "distrib embed" in err

    err = _stack_err(capsys, tmp_path, paths[0], paths[0])
    assert "is given twice" in err and "each expert's oof_embeddings.parquet once" in err
    (tmp_path / "copy.parquet").write_bytes(paths[0].read_bytes())
    err = _stack_err(capsys, tmp_path, paths[0], tmp_path / "copy.parquet")
    assert "holds the same expert ('cnn', identical probabilities)" in err
    assert not (tmp_path / "s" / "meta_model.json").exists()  # nothing was fit
