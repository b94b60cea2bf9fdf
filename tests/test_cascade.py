"""Cascade: routing sends exactly the band to stage 2; config errors; one real small cascade over the demo shards."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from distrib.cascade import cascade_score, route
from distrib.cascade_config import load_cascade_config
from distrib.config import ConfigError, load_config

DEBUG = REPO / "launch" / "configs" / "debug.yaml"


def test_routing_escalates_exactly_the_band():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(500), [0.2, 0.7, 0.19999, 0.69999]])  # edges: t_low is in, t_high is out
    dec, esc = route(p, 0.2, 0.7)
    np.testing.assert_array_equal(esc, (p >= 0.2) & (p < 0.7))
    np.testing.assert_array_equal(dec[~esc], (p[~esc] >= 0.7).astype(int))
    assert (dec[esc] == -1).all()
    assert esc[-4:].tolist() == [True, False, False, True]
    _, none = route(p, -np.inf, np.inf)  # an infeasible stage-1 band escalates everything
    assert none.all()


def test_cascade_score_orders_paths_and_decides_at_half():
    p1 = np.array([0.05, 0.15, 0.3, 0.5, 0.6, 0.8, 0.95])
    meta = np.array([np.nan, np.nan, 0.1, 0.9, 0.5, np.nan, np.nan])
    s = cascade_score(p1, 0.2, 0.7, meta, 0.4)
    assert (s[:2] < 0.25).all() and (s[5:] >= 0.75).all() and ((s[2:5] >= 0.25) & (s[2:5] < 0.75)).all()
    # decisions at 0.5 equal the cascade's: stage 1 outside the band, meta >= 0.4 inside
    np.testing.assert_array_equal((s >= 0.5).astype(int), [0, 0, 0, 1, 1, 1, 1])
    assert s[0] < s[1] and s[5] < s[6] and s[2] < s[4] < s[3]


def test_cascade_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage1: {run: s1}\nstack: {dir: st, rule: yuoden}\n")
    with pytest.raises(ConfigError, match="stack.rule"):
        load_cascade_config(cfg)
    cfg.write_text("stage1: {run: s1}\nstack: {dir: st}\nbatch_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown cascade key 'batch_sise'.*did you mean 'batch_size'"):
        load_cascade_config(cfg)
    cfg.write_text("stage1: {run: s1, treshold: x}\nstack: {dir: st}\n")
    with pytest.raises(ConfigError, match="stage1.treshold"):
        load_cascade_config(cfg)
    cfg.write_text("stage1: {run: s1}\nstack: {dir: st}\n")
    c = load_cascade_config(cfg)
    assert c.stage1.run == str(tmp_path / "s1") and c.stack.dir == str(tmp_path / "st")  # relative to the YAML
    for shipped in ("cascade_deepfake.yaml", "cascade_debug.yaml"):
        load_cascade_config(REPO / "launch" / "configs" / shipped)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_cascade_on_demo_shards(demo_shards, tmp_path_factory):
    """3 tiny fold runs -> two experts' OOF tables -> stack -> cascade on test; every artifact parses."""
    from distrib.embed import extract_oof
    from distrib.stack import fit_stack
    from distrib.train import run

    root = tmp_path_factory.mktemp("cascade")
    runs = []
    for k in range(3):
        run(load_config(DEBUG, [f"data.shards={demo_shards}", f"data.fold={k}", "train.epochs=1",
                                "data.samples_per_epoch=32", "train.latency_batches=0"]), root / f"fold{k}")
        runs.append(str(root / f"fold{k}"))
    # Two experts over the same fold runs but different projections (8-D and 4-D embeddings), so the
    # cascade has two aligned experts with their own saved alignments; names get disambiguated by stack.
    for name, dim in (("a", 8), ("b", 4)):
        embed = load_config(DEBUG, [f"embed.dim={dim}", "embed.anchors=24", "embed.fit_samples=64"]).embed
        extract_oof(runs, root / f"{name}_oof.parquet", embed)
    stack_cfg = load_config(DEBUG, ["stack.n_jobs=1", "stack.n_estimators=30"]).stack
    fit_stack([root / "a_oof.parquet", root / "b_oof.parquet"], root / "stack", stack_cfg)
    (root / "cascade.yaml").write_text("name: tiny\nbatch_size: 16\nbootstrap: 20\nrecall: 0.9\nspecificity: 0.5\n"
                                       "stage1: {run: fold0}\nstack: {dir: stack}\n")
    from distrib.cascade import run_cascade
    res = run_cascade(root / "cascade.yaml", "test", root / "out")

    out = root / "out"
    saved = json.loads((out / "evaluation_results.json").read_text())
    preds = pd.read_csv(out / "cascade_predictions.csv")
    n_test = int(json.loads((demo_shards / "index.json").read_text())["split_counts"]["test"])
    assert saved["n"] == len(preds) == n_test and preds["key"].is_unique  # every test sample exactly once
    band = saved["thresholds"]["stage1_band"]
    lo, hi = (band["t_low"], band["t_high"]) if band["feasible"] else (-np.inf, np.inf)
    in_band = (preds["stage1_prob"] >= lo) & (preds["stage1_prob"] < hi)
    assert (preds["escalated"] == in_band).all()  # exactly the band went to stage 2
    assert preds.loc[preds["escalated"], "meta_prob_escalated"].notna().all()
    assert preds.loc[~preds["escalated"], "meta_prob_escalated"].isna().all()
    assert saved["escalation_rate"] == pytest.approx(in_band.mean())
    assert set(saved["metrics"]) >= {"cascade", "stage1", "meta (stage 2+3 on all)"}
    assert sum(k.startswith("expert:") for k in saved["metrics"]) == 2
    assert saved["cost"]["cascade_mean_ms"] >= saved["cost"]["stage1_mean_ms"] > 0
    assert saved["complementarity"]["pairs"][0]["n"] == n_test
    report = (out / "report.md").read_text()
    assert "## Quality" in report and "## Complementarity" in report
    for rel in saved["plots"].values():
        assert (out / rel).is_file(), rel
    assert res["report"] == str(out / "report.md")
