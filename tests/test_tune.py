"""Ray Tune sweep: real Ray cluster (`ray start --head` on 127.0.0.1, shared by the session, conftest.ray_cluster), real trials.

The cluster is started once in a subprocess and every sweep joins it with ``address=`` / ``--address``,
which is also the multi-node path. Trials train the debug config for 2 tiny epochs on the demo shards.
"""

from __future__ import annotations

import glob
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import PYTHON, REPO, subprocess_env
from distrib.config import ConfigError, load_config
from distrib.errors import DistribError
from distrib.sweep.driver import run_sweep
from distrib.sweep.grid import grid_configs, load_grid, trial_command
from distrib.sweep.report import choose_best
from distrib.sweep.trial import FAIL_ONCE_ENV

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
TRIAL = ["train.epochs=2", "data.samples_per_epoch=32", "train.latency_batches=1", "tune.embed_best=false"]


# ------------------------------------------------------------------------------- pure functions


def _summary(means_by_config: dict[str, list[float]]) -> pd.DataFrame:
    rows = [
        {"config_id": c, "fold": k, "auc": v, "status": "done"}
        for c, vals in means_by_config.items()
        for k, v in enumerate(vals)
    ]
    return pd.DataFrame(rows)


def test_choose_best_is_argmax_of_mean_auc():
    best = choose_best(_summary({"c0": [0.6, 0.7, 0.8], "c1": [0.7, 0.8, 0.9], "c2": [0.5, 0.5, 0.5]}), folds=3)
    assert best["config_id"] == "c1" and best["mean"] == pytest.approx(0.8)
    assert best["std"] == pytest.approx(np.std([0.7, 0.8, 0.9], ddof=1))


def test_choose_best_breaks_ties_by_lower_std_and_skips_partial_configs():
    s = _summary({"c0": [0.6, 0.8, 1.0], "c1": [0.8, 0.8, 0.8], "c2": [0.99, 0.99, 0.99]})
    s.loc[(s.config_id == "c2") & (s.fold == 2), "status"] = "missing"  # c2 did not finish every fold
    best = choose_best(s, folds=3)
    assert best["config_id"] == "c1" and best["std"] == 0.0


def test_grid_cross_product_and_trial_command(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("optim.lr: [1.0e-3, 3.0e-3]\ntrain.label_smoothing: [0.0, 0.1]\n")
    configs = grid_configs(load_grid(grid))
    assert [c["id"] for c in configs] == ["c0", "c1", "c2", "c3"]
    assert configs[1]["overrides"] == ["optim.lr=0.001", "train.label_smoothing=0.1"]
    cmd = trial_command("s/config.yaml", "s/trials/c1_fold2", [*configs[1]["overrides"], "data.fold=2"])
    assert (
        cmd
        == "distrib train s/config.yaml --out s/trials/c1_fold2 optim.lr=0.001 train.label_smoothing=0.1 data.fold=2"
    )


def test_bad_grid_fails_before_ray_starts(tmp_path, demo_shards):
    (tmp_path / "g1.yaml").write_text("data.fold: [0, 1]\n")
    with pytest.raises(ConfigError, match="swept automatically"):
        load_grid(tmp_path / "g1.yaml")
    (tmp_path / "g2.yaml").write_text("optim.lr: 0.1\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        load_grid(tmp_path / "g2.yaml")
    cfg = load_config(DEBUG, [f"data.shards={demo_shards}"])
    with pytest.raises(ConfigError, match="optim.lr"):  # a bad value is caught by building every config
        run_sweep(cfg, {"optim.lr": [1e-3, -1.0]}, tmp_path / "s1", address="127.0.0.1:1")
    with pytest.raises(ConfigError, match="tune.folds=5 but the shards"):
        run_sweep(
            load_config(DEBUG, [f"data.shards={demo_shards}", "tune.folds=5"]),
            {},
            tmp_path / "s2",
            address="127.0.0.1:1",
        )
    assert not (tmp_path / "s1").exists()  # a bad grid value writes nothing
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' in the sweep grid.*'optim.lr'"):
        run_sweep(cfg, {"optim.lrr": [1e-3]}, tmp_path / "s3", address="127.0.0.1:1")


def test_sweep_dir_with_other_config_is_refused_without_resume(tmp_path, demo_shards):
    """Finished trials resume from their run dirs, so a changed config must not silently reuse them."""
    from distrib.sweep.driver import _prepare

    cfg = load_config(DEBUG, [f"data.shards={demo_shards}"])
    _prepare(cfg, {"optim.lr": [1e-3]}, tmp_path)
    (tmp_path / "trials").mkdir()  # as after a finished sweep
    _prepare(load_config(DEBUG, [f"data.shards={demo_shards}"]), {"optim.lr": [1e-3]}, tmp_path)  # same: ok
    with pytest.raises(DistribError, match="different config or grid.*--resume"):
        _prepare(load_config(DEBUG, [f"data.shards={demo_shards}", "data.img_size=48"]), {"optim.lr": [1e-3]}, tmp_path)
    with pytest.raises(DistribError, match="different config or grid"):
        _prepare(load_config(DEBUG, [f"data.shards={demo_shards}"]), {"optim.lr": [3e-3]}, tmp_path)


# ------------------------------------------------------------------------------- real Ray cluster


def _events(run_dir: Path) -> list[str]:
    return [line.split()[2] for line in (run_dir / "trial_events.log").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_3_folds_x_2_configs_with_one_injected_failure(ray_cluster, demo_shards, tmp_path, monkeypatch):
    marker = tmp_path / "fail_once.marker"
    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))
    cfg = load_config(
        DEBUG,
        [
            f"data.shards={demo_shards}",
            *TRIAL,
            "tune.max_failures=1",
            "eval.group_agg=max",
            "tune.ship_checkpoints=true",
        ],
    )
    out = tmp_path / "sweep"
    result = run_sweep(cfg, {"optim.lr": [1e-3, 3e-3]}, out, address=ray_cluster)

    summary = pd.read_csv(out / "sweep_summary.csv")
    assert len(summary) == 6 and (summary["status"] == "done").all(), summary
    assert sorted(zip(summary.config_id, summary.fold)) == [(c, k) for c in ("c0", "c1") for k in range(3)]
    means = summary.groupby("config_id")["auc"].mean()
    assert result["best"]["config_id"] == means.idxmax()
    assert result["best"]["mean"] == pytest.approx(means.max())
    assert load_config(out / "best_config.yaml").optim.lr == {"c0": 1e-3, "c1": 3e-3}[means.idxmax()]
    assert (out / "fold_auc.png").stat().st_size > 1000
    for _, row in summary.iterrows():  # the stored command replays the trial exactly as Tune ran it
        assert f"--out {row.trial_dir} " in row.command and row.command.endswith(f"data.fold={row.fold}")
        run_cfg = load_config(Path(row.trial_dir) / "config.yaml")
        assert run_cfg.data.fold == row.fold and row.epochs == 2
        evaluation = json.loads((Path(row.trial_dir) / "evaluation_results.json").read_text())
        assert row.group_auc == pytest.approx(evaluation["group_metrics"]["auc"], abs=1e-6)  # group level too
        assert glob.glob(f"{row.trial_dir}/tb/**/events.out.tfevents*", recursive=True), "TensorBoard per trial"
    # Tune keeps its per-trial progress.csv/result.json but writes no TensorBoard copy of the trials' metrics
    assert len(glob.glob(f"{out}/ray_results/sweep/*/progress.csv")) == 6
    # tune.ship_checkpoints=true (opt-in): Tune also keeps each trial's last checkpoint in its storage
    shipped = glob.glob(f"{out}/ray_results/sweep/*/checkpoint_*/state.pt")
    assert len(shipped) == 6, shipped
    assert all("/trials/" in p for p in glob.glob(f"{out}/**/events.out.tfevents*", recursive=True))

    failed = marker.read_text()  # the one trial that failed after its first report, then was retried
    for name in (f"c{c}_fold{k}" for c in range(2) for k in range(3)):
        events = _events(out / "trials" / name)
        if name == failed:
            assert events.count("start") == 2 and "resume" in events and events[-1] == "done", events
            assert json.loads((out / "trials" / name / "trial_result.json").read_text())["resumed"]
        else:
            assert events == ["start", "done"], (name, events)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, demo_shards, tmp_path):
    """Joins the `ray start` cluster through the CLI entry point, is stopped midway, then --resume."""
    (tmp_path / "grid.yaml").write_text("optim.lr: [1.0e-3]\n")
    out = tmp_path / "sweep"
    cmd = [
        PYTHON,
        str(REPO / "tune" / "sweep.py"),
        str(DEBUG),
        f"data.shards={demo_shards}",
        *TRIAL,
        "tune.max_concurrent=1",
        "--grid",
        str(tmp_path / "grid.yaml"),
        "--out",
        str(out),
        "--address",
        ray_cluster,
    ]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = out / "trials" / "c0_fold0" / "trial_result.json"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert first.exists(), proc.communicate(timeout=60)[0][-3000:]
    proc.send_signal(signal.SIGINT)  # Tune saves its experiment state and stops the remaining trials
    log = proc.communicate(timeout=180)[0]
    summary = pd.read_csv(out / "sweep_summary.csv")
    assert (summary["status"] == "done").sum() < 3, log[-3000:]

    resumed = subprocess.run(
        [*cmd, "--resume"], env=subprocess_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=420
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = pd.read_csv(out / "sweep_summary.csv")
    assert len(summary) == 3 and (summary["status"] == "done").all(), summary
    assert "group_auc" not in summary.columns  # eval.group_agg none: no empty group columns
    assert _events(out / "trials" / "c0_fold0") == ["start", "done"]  # finished trial was not re-run
    assert json.loads((out / "sweep_results.json").read_text())["best"]["config_id"] == "c0"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_trials_run_2_gloo_workers_each_with_equal_rank_checksums(ray_cluster, demo_data, tmp_path):
    """tune.workers_per_trial=2: each (config, fold) trial is a Ray Train TorchTrainer of 2 DDP workers.

    0.49 CPU per worker lets both folds' 4 workers plus the 0.01-CPU trial drivers fit the 2-CPU cluster.
    """
    from distrib.data.shards import write_shards

    shards = tmp_path / "shards2"  # 2 folds: the smallest complete sweep (tune.folds must match the shards)
    write_shards(
        demo_data / "train_manifest.csv",
        shards,
        val=demo_data / "val_manifest.csv",
        test=demo_data / "test_manifest.csv",
        folds=2,
        seed=0,
        shard_size=30,
        workers=1,
    )
    cfg = load_config(
        DEBUG, [f"data.shards={shards}", *TRIAL, "tune.folds=2", "tune.workers_per_trial=2", "tune.cpus_per_trial=0.49"]
    )
    out = tmp_path / "sweep"
    t0 = time.time()
    result = run_sweep(cfg, {"optim.lr": [1e-3]}, out, address=ray_cluster)
    print(f"2-worker DDP sweep (1 config x 2 folds): {time.time() - t0:.1f} s")

    assert result["errors"] == [] and result["best"]["config_id"] == "c0", result
    summary = pd.read_csv(out / "sweep_summary.csv")
    assert sorted(zip(summary.config_id, summary.fold)) == [("c0", 0), ("c0", 1)]
    assert (summary["status"] == "done").all() and (summary["epochs"] == 2).all(), summary
    for _, row in summary.iterrows():
        run_dir = Path(row.trial_dir)
        ev = json.loads((run_dir / "evaluation_results.json").read_text())
        assert ev["world_size"] == 2 and ev["backend"] == "gloo" and ev["distributed_type"] == "MULTI_CPU", ev
        assert row.auc == pytest.approx(ev["best"]["auc"])  # ranked by the best model's AUC, as 1-worker trials
        ranks = json.loads((run_dir / "trial_result.json").read_text())["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}, ranks
        assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"], ranks  # DDP kept the ranks in sync
        assert {r["steps"] for r in ranks} == {2}, ranks
        # every epoch's report reached Tune through TuneReportCallback
        progress = glob.glob(f"{out}/ray_results/sweep/run_trial_*fold={row.fold},*/progress.csv")
        assert len(progress) == 1 and list(pd.read_csv(progress[0])["epoch"]) == [1, 2], progress


@pytest.mark.parametrize(
    "grid_file", sorted((REPO / "launch" / "configs" / "grids").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_grids_build_every_config(grid_file):
    configs = grid_configs(load_grid(grid_file))
    assert len(configs) >= 1
    for c in configs:
        load_config(DEBUG, [*c["overrides"], "data.fold=1"])


def test_embed_dim_above_the_val_count_fails_before_ray_starts(demo_shards, tmp_path):
    """tune.embed_best aligns the fold models on val images; too few for embed.dim used to fail after every fold."""
    from distrib.errors import DataError

    n_val = sum(
        s["count"] for s in json.loads((Path(demo_shards) / "index.json").read_text())["shards"] if s["split"] == "val"
    )
    cfg = load_config(
        DEBUG,
        [
            f"data.shards={demo_shards}",
            f"embed.dim={n_val + 1}",
            f"embed.anchors={n_val + 1}",
            f"embed.fit_samples={n_val + 1}",
        ],
    )
    with pytest.raises(DataError, match=rf"embed.dim={n_val + 1} needs .* has {n_val}; .*embed.dim="):
        run_sweep(cfg, {"optim.lr": [1e-3]}, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_a_trial_on_a_node_that_cannot_see_the_sweep_dir_names_the_file_node_and_fix(tmp_path):
    """A retry resumes from RUN_DIR/last_checkpoint in the sweep dir (Tune ships no copy by default), so a node
    without that dir fails the trial at once, naming the file, the node and the shared-storage rule."""
    from distrib.sweep.trial import check_shared_sweep_dir

    node = {"hostname": "node7", "node_ip": "10.0.0.7"}
    missing = tmp_path / "not_mounted" / "config.yaml"
    with pytest.raises(DistribError) as e:
        check_shared_sweep_dir({"config_path": str(missing)}, node)
    assert str(missing) in str(e.value) and "node7 (10.0.0.7)" in str(e.value) and "shared-storage rule" in str(e.value)
    missing.parent.mkdir()
    missing.write_text("model: {}\n")
    check_shared_sweep_dir({"config_path": str(missing)}, node)  # visible: no error


def test_what_tuner_fit_imports_to_count_callbacks_is_pre_imported(tmp_path):
    """Tuner.fit imports mlflow (~1 s on 2 cores) only to count the callbacks for Ray's usage stats
    (ray.air._internal.usage). The driver pre-imports TUNE_FIT_IMPORTS on a thread while Ray starts; after
    that, counting our callbacks must import nothing heavy outside ray (a Ray upgrade adding one fails here)."""
    code = """
import sys, json
import ray.tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from distrib.sweep.driver import TUNE_FIT_IMPORTS, _import_while_ray_starts
_import_while_ray_starts().join(120)
before = set(sys.modules)
from ray.air._internal.usage import _count_callbacks
_count_callbacks([CSVLoggerCallback(), JsonLoggerCallback()])
new = sorted(m for m in set(sys.modules) - before if not m.startswith("ray"))
print(json.dumps({"new": new, "pre": [m for m in TUNE_FIT_IMPORTS if m in before]}))
"""
    out = subprocess.run(
        [PYTHON, "-c", code], cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["pre"] == ["mlflow"], res
    heavy = [m for m in res["new"] if m.split(".")[0] in ("mlflow", "wandb", "comet_ml", "aim", "torch", "pandas")]
    assert not heavy, heavy


@pytest.mark.timeout(300)
def test_bench_sweep_tune_floor_runs_k_noop_trials_on_the_cluster(ray_cluster, tmp_path):
    """`distrib bench sweep`'s measure of Ray Tune's own cost: K no-op trials on the same (real) cluster."""
    from distrib.bench.sweep import FOLDS, tune_floor

    seconds = tune_floor(ray_cluster, tmp_path / "floor")
    results = glob.glob(f"{tmp_path}/floor/storage/noop/*/result.json")
    assert len(results) == FOLDS and seconds > 0
    assert sorted(json.loads(open(p).readline())["fold"] for p in results) == list(range(FOLDS))
