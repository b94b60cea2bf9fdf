"""MLflow for a sweep: one parent run per sweep; each trial's own run is tagged as its child.

With ``mlflow`` in ``train.trackers`` the driver creates the parent run before Ray starts and hands
the trials an environment (tracking URI, experiment name, ``MLFLOW_TAGS`` with
``mlflow.parentRunId``) that accelerate's MLflow tracker reads when the trial's ``RunLogger`` starts
its run. ``MLFLOW_RUN_ID`` is deliberately not passed: it would make every trial resume the parent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distrib.config import ExperimentConfig
from distrib.training.runlog import check_trackers

_PASS_ON = ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY")


def start_parent(cfg: ExperimentConfig, out_dir: Path) -> dict | None:
    """Create the sweep's parent run; returns {"run_id", "env"} (the trials' env) or None without MLflow."""
    if "mlflow" not in cfg.train.trackers:
        return None
    check_trackers(cfg.train.trackers)  # before any Ray process starts
    import mlflow

    client = mlflow.MlflowClient()
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name
    exp = client.get_experiment_by_name(name)  # created here once, not raced by parallel trials
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    run = client.create_run(exp_id, run_name=out_dir.name, tags={"distrib.sweep_dir": str(out_dir)})
    env = {
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "MLFLOW_EXPERIMENT_NAME": name,
        "MLFLOW_TAGS": json.dumps({"mlflow.parentRunId": run.info.run_id}),
    }
    env.update({k: os.environ[k] for k in _PASS_ON if k in os.environ})
    return {"run_id": run.info.run_id, "env": env}


def finish_parent(parent: dict | None, out_dir: Path, summary: dict | None) -> None:
    """Attach the sweep's outputs to the parent run and close it (FAILED without a summary, KILLED if interrupted)."""
    if parent is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    for name in ("sweep_summary.csv", "best_config.yaml", "sweep_results.json", "fold_auc.png"):
        if summary is not None and (out_dir / name).is_file():
            client.log_artifact(parent["run_id"], str(out_dir / name))
    best = (summary or {}).get("best") or {}
    for key in ("mean", "std"):  # the best config's mean / std fold metric (tune.metric)
        if isinstance(best.get(key), (int, float)):
            client.log_metric(parent["run_id"], f"best/{key}", float(best[key]))
    status = "FAILED" if summary is None else {"interrupted": "KILLED"}.get(summary.get("status"), "FINISHED")
    client.set_terminated(parent["run_id"], status)
