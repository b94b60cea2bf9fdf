"""train.trackers: TensorBoard (own writer) plus MLflow through accelerate's log_with, read back from the store."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, subprocess_env


def _mlflow_env(tmp_path) -> dict:
    env = subprocess_env(tmp_path)
    env.update(MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
               MLFLOW_DISABLE_TELEMETRY="true")
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_logs_params_metrics_and_results_to_mlflow(demo_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    env = _mlflow_env(tmp_path)
    cmd = [PYTHON, "-m", "distrib", "train", "launch/configs/experiments/debug.yaml", "--out", str(out),
           f"data.shards={demo_shards}", "model.name=resnet10t", "train.epochs=2", "optim.lr=3e-3",
           "train.trackers=[tensorboard, mlflow]"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard events are still written

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
    assert params["optim.lr"] == "0.003" and params["model.name"] == "resnet10t"
    assert params["train.trackers"] == "['tensorboard', 'mlflow']"

    client = mlflow.MlflowClient()
    results = json.loads((out / "evaluation_results.json").read_text())
    val_auc = client.get_metric_history(run.info.run_id, "val/auc")
    assert len(val_auc) == 2  # one per epoch
    assert max(m.value for m in val_auc) == pytest.approx(results["best"]["auc"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2
    local = client.download_artifacts(run.info.run_id, "evaluation_results.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == results


def test_tracker_config_errors_before_training(demo_shards, tmp_path, monkeypatch):
    from distrib.config import ConfigError, load_config
    from distrib.training.runlog import check_trackers
    with pytest.raises(ConfigError, match=r"train.trackers.*'tensorbord'.*one of tensorboard, mlflow"):
        load_config(REPO / "launch/configs/experiments/debug.yaml", ["train.trackers=[tensorbord]"])
    assert load_config(REPO / "launch/configs/experiments/debug.yaml").train.trackers == ["tensorboard"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        check_trackers(["tensorboard", "mlflow"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_trackers(["tensorboard", "mlflow"])
