"""One Tune trial: a (config, fold) pair trained by the same ``training.trainer.run`` as ``distrib train``.

``tune.workers_per_trial > 1`` runs the trial as a Ray Train TorchTrainer (DDP inside a trial).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from distrib.atomic import write_json
from distrib.config import load_config
from distrib.errors import DistribError
from distrib.sweep import zygote
from distrib.sweep.grid import config_id, grid_configs, trial_command, trial_overrides

log = logging.getLogger(__name__)
FAIL_ONCE_ENV = "DISTRIB_FAIL_ONCE"  # fault injection: path of a marker file; the first trial to report fails once


def _log_event(run_dir: Path, event: str, detail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "trial_events.log", "a") as f:
        f.write(f"{time.time():.3f} {os.getpid()} {event}{' ' + detail if detail else ''}\n")


def _events(run_dir: Path) -> list[str]:
    return [line.split()[2] for line in (run_dir / "trial_events.log").read_text().splitlines()]


def node_info() -> dict:
    """The Ray node running this trial: node id, its IP and the host name (recorded in the sweep summary)."""
    import socket

    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
    }


def check_shared_sweep_dir(spec: dict, node: dict) -> None:
    """A trial reads SWEEP_DIR/config.yaml and writes its run dir there, and a retry resumes from that run dir's
    last_checkpoint on whichever node runs it: the sweep dir must be the same directory on every node."""
    if not Path(spec["config_path"]).is_file():
        raise DistribError(
            f"{spec['config_path']} (the sweep's config) is not visible on node {node['hostname']} "
            f"({node['node_ip']}): put --out on a filesystem every node mounts at the same path "
            "(docs/training.md, shared-storage rule)"
        )


def _resume_step(run_dir: Path) -> int | None:
    """The optimizer step of the run dir's checkpoint a retry resumes from (None: none, starts from scratch)."""
    from distrib.runs import find_checkpoint

    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return None
    from distrib.training.checkpoint import saved_state

    return int(saved_state(ckpt).get("step", 0))


def _maybe_inject_failure(marker: str, name: str) -> None:
    """Fail exactly one trial once: the first to get here creates the marker and raises."""
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(name)
    raise RuntimeError(f"{FAIL_ONCE_ENV} fault injection: trial {name} fails once after its first report")


def _restore_checkpoint(run_dir: Path) -> bool:
    """On a retry, put Tune's last checkpoint back into the run dir (another node may run it)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    local = run_dir / "last_checkpoint"
    if ckpt is not None and not local.exists():
        ckpt.to_directory(str(local))
    return local.exists()


def _numeric(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(params: dict, spec: dict) -> None:
    """Ray Tune function trainable: one (config, fold) pair -> ``train.run`` in its own run dir."""
    grid = spec["grid"]
    cid = config_id(grid, params.get("grid", {}))
    run_fold(
        spec,
        cid,
        int(params["fold"]),
        next(c["overrides"] for c in grid_configs(grid) if c["id"] == cid),
        params.get("grid", {}),
    )


def run_fold(
    spec: dict, cid: str, fold: int, config_overrides: list[str], grid_params: dict, epoch_reports: bool = True
) -> dict:
    """Train config ``cid`` on ``fold`` into ``trials/<cid>_fold<fold>``; write and return trial_result.json.

    ``epoch_reports``: each epoch's metrics (and checkpoint) go to ``tune.report`` (one trial per fold);
    a per-config CV trial (``search.run_cv_trial``) reports once per fold itself instead.
    """
    t_start = time.time()
    from ray import tune

    name = f"{cid}_fold{fold}"
    run_dir = Path(spec["trials_dir"]) / name
    overrides = trial_overrides(config_overrides, fold)
    node = node_info()
    check_shared_sweep_dir(spec, node)
    _log_event(run_dir, "start", node["node_id"])
    os.environ.update(spec.get("tracker_env", {}))  # MLflow: parent run id, experiment, store (sweep/tracking.py)
    resume = _restore_checkpoint(run_dir)
    resume_step = _resume_step(run_dir) if resume else None
    if resume:
        _log_event(run_dir, "resume", str(resume_step))
    # this node's trial fork server; CPU trials only (CUDA in forked children is untested: no GPU here)
    sock = zygote.available() if spec.get("workers", 1) == 1 and not spec.get("gpus") else None
    cfg = None
    if not sock:
        from distrib.training import trainer  # noqa: F401  lazy: torch/timm imports are the bulk of a start-up

        cfg = load_config(spec["config_path"], overrides)
    t_import = time.time()
    reports = {"n": 0, "ckpt_s": 0.0, "epoch": 0}

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        t0 = time.time()
        ship = spec.get("ship_checkpoints", True) and checkpoint_dir and Path(checkpoint_dir).is_dir()
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if ship else None
        if epoch_reports:
            tune.report(_numeric(metrics), checkpoint=ckpt)
        reports["n"] += 1
        reports["epoch"] = int(metrics.get("epoch", reports["n"]))
        reports["ckpt_s"] += time.time() - t0
        _maybe_inject_failure(spec.get("fail_once", ""), name)

    ranks, threads = None, None
    if spec.get("workers", 1) > 1:  # the workers report to Tune themselves; take their counts
        final = run_ddp_trial(spec, overrides, run_dir, resume)
        ranks = final.pop("ranks")
        reports["n"], reports["epoch"] = final.pop("reports"), final.pop("epochs")
    else:
        final = None
        if sock:
            try:  # forked from a process that imported everything already (sweep/zygote.py)
                final, threads = zygote.run_in_child(sock, spec["config_path"], overrides, run_dir, resume, report)
            except zygote.Unreachable as e:
                log.warning("%s; trial %s imports and trains in this process", e, name)
                sock = None
        if not sock:
            import torch

            from distrib.training import trainer as train

            final = train.run(
                cfg or load_config(spec["config_path"], overrides), str(run_dir), resume=resume, report=report
            )
            threads = torch.get_num_threads()
    t_end = time.time()
    result = {
        "config_id": cid,
        "fold": fold,
        "params": grid_params,
        "overrides": overrides,
        "metrics": _numeric(final or {}),
        "reports": reports["n"],
        "epochs": reports["epoch"],
        "seconds": t_end - t_import,
        "trial_seconds": t_end - t_start,
        "startup_seconds": t_import - t_start,
        "report_seconds": reports["ckpt_s"],
        "fork_server": bool(sock),
        "torch_threads": threads,
        "resumed": resume,
        "resume_step": resume_step,
        **node,
        "attempts": _events(run_dir).count("start"),
        "run_dir": str(run_dir),
        "command": trial_command(spec["config_path"], run_dir, overrides),
        **({"ranks": ranks} if ranks else {}),
    }
    write_json(run_dir / "trial_result.json", result, indent=1)
    _log_event(run_dir, "done")
    return result


# ------------------------------------------------------------------------------- DDP inside a trial
# tune.workers_per_trial > 1. Ray 2.60 runs Ray Train V2, where a Trainer is no longer passed to Tuner:
# the Tune function trainable builds and fits a TorchTrainer, whose reports reach Tune through
# TuneReportCallback. Ray Train starts the workers and sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and the
# process group; accelerate (inside train.run) picks that up and dist.build_accelerator leaves the host's
# group alone, so every worker runs the same train.run. All ranks call ray.train.report (V2 requires it);
# only rank 0 attaches the checkpoint, and only when the sweep ships checkpoints (cluster/--storage; a
# retry otherwise resumes from the run dir's last_checkpoint, as in the 1-worker path). V2 drops the
# train function's return value, so each rank writes its train.run result (best-epoch metrics,
# world_size, backend, param_checksum) to RANK_RESULT; rank 0's becomes the trial's metrics, so the
# summary ranks DDP trials by the best model's AUC exactly like 1-worker trials. The trial holds 0.01 CPU,
# the workers hold cpus/gpus_per_trial each. Status: tested (tests/test_tune.py::test_ddp_trials_*): a
# 1-config x 2-fold sweep of 2-worker gloo trials on the shared `ray start` cluster; asserts world_size 2,
# gloo, equal per-rank parameter checksums and the summary rows. Untested: GPUs/nccl, multi-node, retry
# and --resume of a DDP trial.
RANK_RESULT = "ddp_rank{rank}.json"  # per-rank train.run result in the trial's run dir


def _worker_loop(config: dict) -> None:
    import ray.train

    from distrib.training import trainer as train

    cfg = load_config(config["config_path"], config["overrides"])
    rank = ray.train.get_context().get_world_rank()
    counts = {"reports": 0, "epochs": 0}

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        ship = rank == 0 and config["ship_checkpoints"] and checkpoint_dir and Path(checkpoint_dir).is_dir()
        ray.train.report(
            _numeric(metrics), checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if ship else None
        )
        counts["reports"] += 1
        counts["epochs"] = int(metrics.get("epoch", counts["reports"]))

    result = train.run(cfg, config["run_dir"], resume=config["resume"], report=report)
    write_json(Path(config["run_dir"]) / RANK_RESULT.format(rank=rank), {**result, **counts, "rank": rank}, indent=1)


def run_ddp_trial(spec: dict, overrides: list[str], run_dir: Path, resume: bool) -> dict:
    """Fit a TorchTrainer of ``spec['workers']`` DDP workers; returns rank 0's result plus every rank's."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    workers, gpus = int(spec["workers"]), float(spec.get("gpus", 0.0))
    for r in range(workers):  # a retry must not read a previous attempt's results
        (run_dir / RANK_RESULT.format(rank=r)).unlink(missing_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config_path": spec["config_path"],
            "overrides": overrides,
            "run_dir": str(run_dir),
            "resume": resume,
            "ship_checkpoints": spec.get("ship_checkpoints", True),
        },
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": float(spec.get("cpus", 1.0)), "GPU": gpus},
        ),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir / "ray_train"), callbacks=[TuneReportCallback()]
        ),
    )
    trainer.fit()  # raises TrainingFailedError if a worker failed
    paths = [run_dir / RANK_RESULT.format(rank=r) for r in range(workers)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DistribError(
            f"DDP trial {run_dir.name}: ranks finished without writing {missing}; see the Ray "
            f"Train worker logs under {run_dir / 'ray_train'}"
        )
    ranks = [json.loads(p.read_text()) for p in paths]
    return {
        **ranks[0],
        "ranks": [{k: r.get(k) for k in ("rank", "world_size", "backend", "steps", "param_checksum")} for r in ranks],
    }
