"""train.trackers: TensorBoard (own writer) plus MLflow through accelerate's log_with, read back from the store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, subprocess_env


def _mlflow_env(tmp_path) -> dict:
    env = subprocess_env(tmp_path)
    env.update(
        MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}",
        MLFLOW_ALLOW_FILE_STORE="true",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tensorboard_and_mlflow_log_together(demo_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    env = _mlflow_env(tmp_path)
    cmd = [
        PYTHON,
        "-m",
        "distrib",
        "train",
        "launch/configs/experiments/debug.yaml",
        "--out",
        str(out),
        f"data.shards={demo_shards}",
        "model.name=test_resnet",
        "train.epochs=2",
        "optim.lr=3e-3",
        "train.trackers=[tensorboard, mlflow]",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the same run with TensorBoard alone: MLflow beside it must not change what TensorBoard records
    alone = subprocess.run(
        [*cmd[:6], str(tmp_path / "tb_only"), *cmd[7:-1], "train.trackers=[tensorboard]"],
        cwd=REPO,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert alone.returncode == 0, alone.stderr[-4000:]
    tb, tb_only = _tb_scalars(out / "tb"), _tb_scalars(tmp_path / "tb_only" / "tb")
    assert {"train/loss", "train/lr", "val/auc", "val/val_loss"} <= set(tb_only)
    assert {tag: len(points) for tag, points in tb.items()} == {tag: len(points) for tag, points in tb_only.items()}

    import mlflow

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.setenv(key, env[key])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["debug"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["distrib.run_dir"] == str(out.resolve())
    params = run.data.params
    assert params["optim.lr"] == "0.003" and params["model.name"] == "test_resnet"
    assert params["train.trackers"] == "['tensorboard', 'mlflow']"

    client = mlflow.MlflowClient()
    results = json.loads((out / "evaluation_results.json").read_text())
    val_auc = client.get_metric_history(run.info.run_id, "val/auc")
    assert len(val_auc) == 2  # one per epoch
    assert max(m.value for m in val_auc) == pytest.approx(results["best"]["auc"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2
    local = client.download_artifacts(run.info.run_id, "evaluation_results.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == results
    # every tracker got the same scalars: each TensorBoard series is the MLflow metric of that name
    assert set(run.data.metrics) == set(tb)
    for tag, points in tb.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert [s for s, _ in history] == [e.step for e in points], tag
        assert [v for _, v in history] == pytest.approx([e.value for e in points], rel=1e-6), tag


def _tb_scalars(tb_dir: Path) -> dict:
    """{tag: [ScalarEvent, ...]} read back from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_tracker_config_errors_before_training(demo_shards, tmp_path, monkeypatch):
    from distrib.config import ConfigError, load_config
    from distrib.training.runlog import check_trackers

    with pytest.raises(ConfigError, match=r"train.trackers.*'tensorbord'.*one of tensorboard, mlflow"):
        load_config(REPO / "launch/configs/experiments/debug.yaml", ["train.trackers=[tensorbord]"])
    assert load_config(REPO / "launch/configs/experiments/debug.yaml").train.trackers == ["tensorboard"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set"):
        check_trackers(["mlflow"])
    check_trackers(["tensorboard"])  # no MLflow, no requirement
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        check_trackers(["tensorboard", "mlflow"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_trackers(["tensorboard", "mlflow"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_is_one_parent_run_with_one_child_per_trial(demo_shards, tmp_path, monkeypatch):
    import mlflow

    from distrib.config import load_config
    from distrib.sweep.driver import run_sweep

    for key, value in _mlflow_env(tmp_path).items():
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")  # this process's store (another test may have set one)
    cfg = load_config(
        REPO / "launch/configs/experiments/debug.yaml",
        [
            f"data.shards={demo_shards}",
            "model.name=test_resnet",  # tiny: 3 trials of resnet10t wrote ~230 MB
            "train.epochs=1",
            "data.samples_per_epoch=32",
            "train.latency_batches=1",
            "tune.embed_best=false",
            "train.trackers=[tensorboard, mlflow]",
        ],
    )
    out = tmp_path / "sweep"
    result = run_sweep(cfg, {"optim.lr": [1e-3]}, out, num_cpus=2)
    assert result["best"]["config_id"] == "c0"
    # tune.fork_server (default): the private cluster's trials ran in processes forked from sweep.zygote, with
    # the actor's environment (MLflow's variables: the child runs below exist) and its 1 CPU's torch threads
    trials = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/trial_result.json"))]
    assert [(t["fork_server"], t["torch_threads"]) for t in trials] == [(True, 1)] * 3, trials
    assert all((Path(t["run_dir"]) / "trial_output.log").stat().st_size > 0 for t in trials)  # the child's output

    runs = mlflow.search_runs(experiment_names=["debug"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["distrib.sweep_dir"] == str(out.resolve())
    assert parent.data.metrics["best/mean"] == pytest.approx(result["best"]["mean"])
    children = mlflow.search_runs(
        experiment_names=["debug"],
        output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(c.info.run_name for c in children) == ["c0_fold0", "c0_fold1", "c0_fold2"]
    assert all(c.info.status == "FINISHED" and c.data.params["optim.lr"] == "0.001" for c in children)
    for c in children:  # each trial's run dir and its evaluation_results.json artifact
        assert c.data.tags["distrib.run_dir"] == str(out.resolve() / "trials" / c.info.run_name)
        assert "evaluation_results.json" in [a.path for a in mlflow.MlflowClient().list_artifacts(c.info.run_id)]
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)]
    assert {"sweep_summary.csv", "best_config.yaml"} <= set(names)
