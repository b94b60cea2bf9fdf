"""embed.inference=refit: one extra model on all training folds, aligned into the OOF rows' frame; the cascade and
`distrib predict` then run ONE model per expert, and the meta-model's AUC is reported both ways."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from distrib.cli import main as cli_main
from distrib.config import ConfigError, load_config

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
SMALL = [
    "embed.dim=8",
    "embed.anchors=24",
    "embed.fit_samples=64",
    "embed.batch_size=16",
    "embed.inference=refit",
    "stack.folds=2",
    "stack.n_estimators=20",
    "thresholds.bootstrap=10",
]


@pytest.fixture(scope="module")
def refit_cascade(fold_runs, tmp_path_factory):
    """The 3 session fold runs form one expert embedded with refit (trains the one extra model); fold 0 is stage 1."""
    from distrib.stacking.embed import extract_oof
    from distrib.stacking.stack import fit_stack

    root = tmp_path_factory.mktemp("refit")
    cfg = load_config(DEBUG, SMALL)
    oof = root / "oof_embeddings.parquet"
    extract_oof(fold_runs, oof, cfg.embed)
    stack = fit_stack([oof], root / "stack", cfg.stack)
    path = root / "cascade.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny refit",
                "batch_size": 16,
                "device": "cpu",
                "recall": 0.9,
                "specificity": 0.5,
                "bootstrap": 10,
                "stage1": {"run": fold_runs[0]},
                "stack": {"dir": str(root / "stack")},
            }
        )
    )
    return {"root": root, "oof": oof, "stack": stack, "yaml": path}


def test_embed_inference_is_validated():
    with pytest.raises(ConfigError, match="embed.inference.*folds, refit"):
        load_config(DEBUG, ["embed.inference=all"])
    assert load_config(DEBUG).embed.inference == "folds"  # the default keeps every existing pipeline as it was


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_refit_model_lands_in_the_oof_rows_aligned_space(refit_cascade, fold_runs):
    from distrib.stacking.align import load_alignment
    from distrib.stacking.embed import alignment_path
    from distrib.stacking.refit import refit_paths, train_refit

    paths = refit_paths(refit_cascade["oof"])
    cfg = load_config(paths["run"] / "config.yaml")
    assert cfg.data.fold == -1 and (paths["run"] / "best_model.pth").is_file()  # trained on every training fold
    stamp = (paths["run"] / "best_model.pth").stat().st_mtime_ns
    assert train_refit(fold_runs[0], paths["run"]) == str(paths["run"])  # a finished refit run is reused ...
    assert (paths["run"] / "best_model.pth").stat().st_mtime_ns == stamp  # ... not retrained
    folds_meta = load_alignment(alignment_path(refit_cascade["oof"]))[1]
    assert folds_meta["inference"] == "refit" and folds_meta["refit"]["run"] == str(paths["run"])
    aligns, meta = load_alignment(paths["alignment"])
    assert len(aligns) == 1 and meta["runs"] == [str(paths["run"])] and 0 <= aligns[0].residual < 1
    oof, refit = pd.read_parquet(refit_cascade["oof"]), pd.read_parquet(paths["table"])
    emb = [c for c in oof.columns if c.startswith("emb_")]
    assert emb == [c for c in refit.columns if c.startswith("emb_")] and len(emb) == 8
    assert set(refit["split"]) == {"val", "test"} and np.isfinite(refit[emb].to_numpy()).all()
    for split in ("val", "test"):  # the same samples as the K-fold rows, in the same coordinates' scale
        a = oof[oof["split"] == split].set_index("key").sort_index()
        b = refit[refit["split"] == split].set_index("key").sort_index()
        assert list(a.index) == list(b.index)
        ra, rb = np.linalg.norm(a[emb].to_numpy(), axis=1), np.linalg.norm(b[emb].to_numpy(), axis=1)
        assert 0.2 < np.median(rb) / np.median(ra) < 5
    sr = refit_cascade["stack"]["refit_splits"]
    for split in ("val", "test"):  # the meta-model's AUC both ways, the difference shown whatever its sign
        r = sr[split]
        assert 0 <= r["meta_auc"] <= 1 and r["meta_auc_folds"] == refit_cascade["stack"]["splits"][split]["meta_auc"]
        assert r["diff_refit_minus_folds"] == pytest.approx(r["meta_auc"] - r["meta_auc_folds"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_refit_cascade_runs_one_model_per_expert_and_predict_matches(refit_cascade, demo_shards, tmp_path, capsys):
    assert (
        cli_main(["cascade", "--config", str(refit_cascade["yaml"]), "--split", "test", "--out", str(tmp_path / "c")])
        == 0
    )
    res = json.loads((tmp_path / "c" / "evaluation_results.json").read_text())
    cost = res["cost"]
    assert list(cost["models_per_expert"].values()) == [1] and cost["expert_models"] == ["refit"]
    assert cost["cascade_folds_mean_ms"] > 0 and cost["always23_folds_mean_ms"] > 0  # the K-fold cost, same images
    run = res["refit_vs_folds"]["this_run"]
    assert run["diff_refit_minus_folds"] == pytest.approx(run["meta_auc_refit"] - run["meta_auc_folds"])
    assert set(res["refit_vs_folds"]["stack_refit_splits"]) == {"val", "test"}
    report = (tmp_path / "c" / "report.md").read_text()
    assert "models per expert: " in report and "K fold models per expert" in report and "Folds vs refit" in report
    capsys.readouterr()

    out = tmp_path / "p" / "preds.csv"
    assert (
        cli_main(
            [
                "predict",
                "--model",
                str(refit_cascade["yaml"]),
                "--images",
                str(demo_shards),
                "--split",
                "test",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["models_per_expert"].values()) == [1]
    ref, preds = pd.read_csv(tmp_path / "c" / "cascade_predictions.csv"), pd.read_csv(out)
    m = ref.merge(preds, left_on="key", right_on="path", validate="one_to_one")
    assert len(m) == len(ref) == len(preds)
    esc = m["escalated"].to_numpy().astype(bool)
    assert esc.any() and np.abs(m.loc[esc, "meta_prob_escalated"] - m.loc[esc, "meta_prob_y"]).max() < 1e-6
    assert np.abs(m["cascade_score"] - m["score"]).max() < 1e-6 and (m["final_decision"] == m["decision"]).all()


def test_predict_on_a_run_uses_its_saved_val_threshold(fold_runs):
    """No thresholds.json: the run's Youden threshold fit on its own val predictions, not 0.5."""
    from pathlib import Path

    from distrib.inference.predict import RunScorer
    from distrib.stacking.thresholds import threshold_youden

    run = Path(fold_runs[1])
    scorer = RunScorer(run, "cpu")
    saved = json.loads((run / "evaluation_results.json").read_text())["optimal_threshold"]
    val = pd.read_csv(run / "val_predictions.csv")
    assert scorer.rule["kind"] == "single" and scorer.threshold == pytest.approx(saved)
    assert saved == pytest.approx(threshold_youden(val["label"].to_numpy(), val["prob"].to_numpy()))
    assert "evaluation_results.json" in scorer.rule["source"]


def test_bench_easy_dataset_is_separable_and_grouped(tmp_path):
    """`distrib bench cascade build=easy`'s data: positives carry the bright square, groups stay in one split."""
    from PIL import Image

    from distrib.bench.easy_cascade import build_dataset

    man = build_dataset(tmp_path, n=40)
    frames = {s: pd.read_csv(p) for s, p in man.items()}
    assert all(set(f["label"]) == {0, 1} for f in frames.values())
    groups = [set(f["group"]) for f in frames.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    for _, row in pd.concat(frames.values()).iterrows():
        bright = (np.asarray(Image.open(row["path"])) >= 250).all(axis=2).sum()
        assert (bright >= 400) == bool(row["label"])
