"""tune.search random|optuna: one Tune trial per sampled config runs all K folds; ASHA stops whole configs.

Real Ray (the session's `ray start` cluster, conftest.ray_cluster), real debug-config trials on 2-fold
shards built from the demo data.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from distrib.cli import main
from distrib.config import ConfigError, load_config
from distrib.errors import DistribError
from distrib.sweep.driver import run_sweep
from distrib.sweep.grid import load_grid

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
TRIAL = [
    "train.epochs=1",
    "data.samples_per_epoch=32",
    "train.latency_batches=1",
    "tune.embed_best=false",
    "tune.folds=2",
]
NO_RAY = "127.0.0.1:1"  # nothing listens there: a test that reached Ray would fail to connect


@pytest.fixture(scope="module")
def shards2(demo_data, tmp_path_factory) -> Path:
    """The demo data as 2-fold shards: the smallest complete CV sweep."""
    from distrib.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards2")
    write_shards(
        demo_data / "train_manifest.csv",
        out,
        val=demo_data / "val_manifest.csv",
        test=demo_data / "test_manifest.csv",
        folds=2,
        seed=0,
        shard_size=30,
        workers=1,
    )
    return out


def test_bad_search_input_fails_before_ray_starts(tmp_path, shards2, capsys):
    cfg = load_config(DEBUG, [f"data.shards={shards2}", *TRIAL])
    space = {"optim.lr": {"loguniform": [1e-5, 1e-3]}}
    with pytest.raises(ConfigError, match=r"samples 'optim.lr'.*--search random or --search optuna"):
        run_sweep(cfg, space, tmp_path / "s1", address=NO_RAY)  # tune.search=grid cannot enumerate it
    (tmp_path / "g.yaml").write_text("optim.lr: {logunifrom: [1.0e-5, 1.0e-3]}\n")
    with pytest.raises(ConfigError, match=r"unknown distribution 'logunifrom'.*did you mean 'loguniform'"):
        load_grid(tmp_path / "g.yaml")
    with pytest.raises(ConfigError, match=r"loguniform.*0 < low < high"):
        run_sweep(cfg, {"optim.lr": {"loguniform": [0, 1e-3]}}, tmp_path / "s2", address=NO_RAY)
    sampled = load_config(DEBUG, [f"data.shards={shards2}", *TRIAL, "tune.search=random"])
    with pytest.raises(ConfigError, match="optim.lr"):  # a bad bound is caught by building the config there
        run_sweep(sampled, {"optim.lr": {"uniform": [-1.0, 1e-3]}}, tmp_path / "s3", address=NO_RAY)
    with pytest.raises(ConfigError, match="nothing to sample"):
        run_sweep(sampled, {}, tmp_path / "s4", address=NO_RAY)
    with pytest.raises(ConfigError, match=r"tune.scheduler=asha needs tune.search=random\|optuna"):
        load_config(DEBUG, ["tune.scheduler=asha"])
    with pytest.raises(ConfigError, match=r"tune.search.*one of grid, random, optuna"):
        load_config(DEBUG, ["tune.search=bayes"])
    (tmp_path / "g2.yaml").write_text("optim.lr: {uniform: [-1.0, 1.0e-3]}\n")
    cli = [
        "tune",
        str(DEBUG),
        f"data.shards={shards2}",
        *TRIAL,
        "--grid",
        str(tmp_path / "g2.yaml"),
        "--address",
        NO_RAY,
    ]
    assert main([*cli, "--out", str(tmp_path / "s5")]) == 2  # grid mode: refused for sampling at all
    assert "--search random or --search optuna" in capsys.readouterr().err
    assert main([*cli, "--out", str(tmp_path / "s6"), "--search", "random", "--num-samples", "3"]) == 2
    assert "invalid value for 'optim.lr': -1.0" in capsys.readouterr().err  # the flag reached tune.search
    assert not any((tmp_path / f"s{i}").exists() for i in range(1, 7))


def _tune_results(out: Path) -> dict[str, list[dict]]:
    """What Tune recorded per trial (and handed to the searcher): trial_id -> its result.json rows."""
    rows = {}
    for path in glob.glob(f"{out}/ray_results/sweep/*/result.json"):
        results = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if results:
            rows[results[0]["trial_id"]] = results
    return rows


def _check_sweep(out: Path, result: dict, folds: int = 2) -> tuple[pd.DataFrame, dict]:
    """Shared checks: every complete config has all folds; the searcher's value == the mean fold AUC."""
    summary = pd.read_csv(out / "sweep_summary.csv")
    configs = {c["id"]: c for c in result["configs"]}
    assert sorted(summary.config_id.unique()) == sorted(configs), summary
    tune_rows = _tune_results(out)
    for cid, c in configs.items():
        rows = summary[summary.config_id == cid].sort_values("fold")
        assert list(rows.fold) == list(range(folds)), rows
        done = rows[rows.status == "done"]
        assert (rows.folds_done == len(done)).all() and c["folds_done"] == len(done)
        aucs = [json.loads((Path(d) / "evaluation_results.json").read_text())["best"]["auc"] for d in done.trial_dir]
        assert list(done.auc) == pytest.approx(aucs)
        reported = tune_rows[c["trial_id"]]  # one report per fold, training_iteration == folds done
        assert [r["training_iteration"] for r in reported] == list(range(1, len(done) + 1))
        assert [r["fold_auc"] for r in reported] == pytest.approx(aucs)
        assert reported[-1]["mean_auc"] == pytest.approx(np.mean(aucs)) == c["mean_auc"]
        for d in done.trial_dir:  # the per-fold run dir is exactly a grid trial's
            tr = json.loads((Path(d) / "trial_result.json").read_text())
            assert tr["config_id"] == cid and tr["overrides"][:-1] == c["overrides"]
            assert load_config(Path(d) / "config.yaml").optim.lr == pytest.approx(c["params"]["optim.lr"])
    best = result["best"]
    assert configs[best["config_id"]]["status"] == "complete"
    complete = summary[summary.config_status == "complete"].groupby("config_id")["auc"].mean()
    assert best["config_id"] == complete.idxmax() and best["mean"] == pytest.approx(complete.max())
    best_cfg = load_config(out / "best_config.yaml")
    assert best_cfg.optim.lr == pytest.approx(configs[best["config_id"]]["params"]["optim.lr"])
    assert best["run_dirs"] == [str(out / "trials" / f"{best['config_id']}_fold{k}") for k in range(folds)]
    return summary, configs


def _optuna_values(out: Path) -> dict[float, list]:
    """What Optuna itself recorded (Tune's saved searcher state): lr -> [(state, value), ...]."""
    import pickle

    state = pickle.loads(Path(glob.glob(f"{out}/ray_results/sweep/searcher-state-*.pkl")[0]).read_bytes())
    values: dict[float, list] = {}
    for t in state["_ot_study"].trials:
        values.setdefault(t.params["grid/optim.lr"], []).append((t.state.name, t.value))
    return values


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("search", ["random", "optuna"])
def test_sampled_configs_each_run_all_folds_and_are_scored_by_mean_auc(ray_cluster, shards2, tmp_path, search):
    cfg = load_config(DEBUG, [f"data.shards={shards2}", *TRIAL, f"tune.search={search}", "tune.num_samples=2"])
    out = tmp_path / "sweep"
    result = run_sweep(cfg, {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, out, address=ray_cluster)
    assert result["status"] == "done" and result["errors"] == [], result
    summary, configs = _check_sweep(out, result)
    assert len(configs) == 2 and (summary.status == "done").all() and (summary.config_status == "complete").all()
    lrs = [c["params"]["optim.lr"] for c in configs.values()]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    assert yaml.safe_load((out / "grid.yaml").read_text()) == {"optim.lr": {"loguniform": [1e-4, 1e-2]}}
    if search == "optuna":  # Optuna's value per config is its mean K-fold AUC
        assert _optuna_values(out) == {
            c["params"]["optim.lr"]: [("COMPLETE", pytest.approx(c["mean_auc"]))] for c in configs.values()
        }
    with pytest.raises(DistribError, match="already holds a sampled sweep.*--resume"):  # configs would mix
        run_sweep(cfg, {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, out, address=ray_cluster)
    again = run_sweep(cfg, {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, out, address=ray_cluster, resume=True)
    assert again["best"]["config_id"] == result["best"]["config_id"] and again["configs"] == result["configs"]
    for d in summary.trial_dir:  # Tuner.restore (searcher state included) re-ran nothing
        assert [line.split()[2] for line in (Path(d) / "trial_events.log").read_text().splitlines()] == [
            "start",
            "done",
        ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_asha_stops_whole_configs_which_are_marked_and_never_best(ray_cluster, shards2, tmp_path):
    """Configs run one at a time (max_concurrent=1), so ASHA (reduction factor 2, a rung after fold 0) stops
    a config whose fold-0 AUC is below the median of the fold-0 AUCs so far. The demo's AUCs after one tiny
    epoch are chance-level, so which config that is comes from the fixed seeds (Optuna's seed = train.seed,
    a deterministic CPU run): here c1 (lr 1e-9, fold-0 AUC 0.4975 < c0's 0.5009). A change to training that
    reorders those AUCs may need another train.seed to reproduce a stop."""
    cfg = load_config(
        DEBUG,
        [
            f"data.shards={shards2}",
            *TRIAL,
            "tune.search=optuna",
            "tune.scheduler=asha",
            "tune.num_samples=3",
            "tune.max_concurrent=1",
        ],
    )
    out = tmp_path / "sweep"
    result = run_sweep(cfg, {"optim.lr": {"choice": [1e-9, 3e-3]}}, out, address=ray_cluster)
    summary, configs = _check_sweep(out, result)
    stopped = [c for c in configs.values() if c["status"] == "stopped"]
    assert stopped and result["status"] == "done", (configs, result)
    for c in stopped:  # stopped as a whole after fold 0: its fold 1 never ran
        rows = summary[summary.config_id == c["id"]]
        assert list(rows.status) == ["done", "stopped"] and (rows.config_status == "stopped").all(), rows
        assert not (out / "trials" / f"{c['id']}_fold1").exists()
        assert c["id"] != result["best"]["config_id"]
    assert result["stopped"] == len(stopped)
    optuna = _optuna_values(out)  # Optuna: stopped configs PRUNED, finished ones their mean K-fold AUC
    for c in configs.values():
        want = ("PRUNED", None) if c["status"] == "stopped" else ("COMPLETE", pytest.approx(c["mean_auc"]))
        assert want in optuna[c["params"]["optim.lr"]], (c, optuna)
