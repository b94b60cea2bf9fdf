"""Ray Tune sweep: one Tuner over (hyper-parameter grid x CV fold), each trial = ``distrib.training.trainer.run``.

    distrib tune launch/configs/experiments/debug.yaml --grid launch/configs/grids/debug.yaml --out runs/sweep \
        data.shards=shards/ [--address HOST:PORT] [--storage /shared/ray] [--num-cpus 4] [--resume]

On a cluster (or to share one Ray instance between sweeps):

    ray start --head --port 6379 --node-ip-address 127.0.0.1 --num-cpus 2 --include-dashboard false
    distrib tune CONFIG --grid GRID --out /shared/sweep --address 127.0.0.1:6379 --storage /shared/ray
    ray stop

Folds are a ``tune.grid_search`` axis next to the grid's keys, so Ray schedules every (config, fold)
pair on whatever CPUs/GPUs the cluster has: a laptop, one multi-GPU box or a Ray cluster, with no code
change. A trial resolves ``load_config(SWEEP_DIR/config.yaml, grid overrides + [data.fold=k])`` and
calls the same ``train.run`` as ``distrib train``; the exact command is stored per trial, so any trial
can be replayed by hand. Run dirs live in ``SWEEP_DIR/trials/<config>_fold<k>`` (on a multi-node
cluster SWEEP_DIR must be on a shared filesystem; Ray's own state goes to ``--storage``).
The grid lives in ``grid.py``, a trial in ``trial.py``, summaries and the best-config choice in ``report.py``.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from pathlib import Path

import yaml

from distrib.atomic import write_json, write_text
from distrib.config import (
    SWEEP_RESUME_SAFE,
    ConfigError,
    ExperimentConfig,
    build_config,
    check_resume,
    config_to_dict,
    load_config,
    parse_override,
    read_yaml_mapping,
    save_config,
    set_dotted,
)
from distrib.errors import DistribError
from distrib.sweep.grid import check_grid, trial_overrides
from distrib.sweep.local_ray import PID_FILE, check_address, reap, start_ray, stop_ray
from distrib.sweep.report import write_outputs
from distrib.sweep.search import (
    check_fresh,
    check_search,
    param_space,
    run_cv_trial,
    sampled_configs,
    tune_config,
    validation_configs,
)
from distrib.sweep.tracking import finish_parent, start_parent
from distrib.sweep.trial import FAIL_ONCE_ENV, run_trial
from distrib.training.checkpoint import remove_stale_tmp

EXPERIMENT = "sweep"  # Ray experiment name under the storage path
GRID_FILE = "grid.yaml"  # the sweep's grid, saved beside its config.yaml
RESUME_CHANGES = "resume_changes.json"  # allowed config changes of each --resume, appended
log = logging.getLogger(__name__)
# Tuner.fit imports these only to count the RunConfig callbacks for Ray's usage stats, even with usage stats
# off (ray.air._internal.usage.tag_callbacks, for any non-empty callback list; ours keeps Tune's
# progress.csv/result.json): importing mlflow there is on the critical path before the first trial
TUNE_FIT_IMPORTS = ("mlflow",)


def _import_while_ray_starts(modules=TUNE_FIT_IMPORTS) -> threading.Thread:
    """Import ``modules`` on a daemon thread while the sweep is prepared and Ray starts or connects (mostly a
    wait on other processes), so that ``Tuner.fit`` finds them imported. Only third-party modules that never
    import ray."""
    import importlib

    def run():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001  optional: Tuner.fit imports it itself
                log.debug("pre-import of %s failed", name, exc_info=True)

    thread = threading.Thread(target=run, name="distrib-preimport", daemon=True)
    thread.start()
    return thread


def init_ray(out_dir: Path, address: str | None, num_cpus: int | None, fork_server: bool = False) -> bool:
    """Connect to ``address`` or start a private loopback-only local cluster (``local_ray.start_ray``);
    returns True if this call started (or connected) Ray, and then ``stop_ray`` must follow."""
    return start_ray(Path(out_dir), address, num_cpus, fork_server=fork_server)


def _check_folds(cfg: ExperimentConfig) -> None:
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty; pass data.shards=DIR (a shard dir holding index.json)")
    from distrib.data.index import read_index

    k = int(read_index(cfg.data.shards)["folds"])
    if k != cfg.tune.folds:
        raise ConfigError(
            f"tune.folds={cfg.tune.folds} but the shards at {cfg.data.shards} have {k} folds; "
            f"set tune.folds={k} (every fold must be swept so the OOF table is complete)"
        )


def _absolute_shards(cfg: ExperimentConfig) -> ExperimentConfig:
    shards = cfg.data.shards
    if shards and "://" not in shards and not shards.startswith("pipe:"):
        cfg.data.shards = str(Path(shards).resolve())
    return cfg


def _check_resume(cfg: ExperimentConfig, grid: dict, out_dir: Path, address: str | None = None) -> Path:
    """--resume: the sweep's saved config and grid must match the new ones, except SWEEP_RESUME_SAFE fields."""
    saved = out_dir / "config.yaml"
    if not saved.is_file():
        raise DistribError(f"--resume: {saved} not found; start the sweep without --resume first")
    old_grid = read_yaml_mapping(out_dir / GRID_FILE) if (out_dir / GRID_FILE).is_file() else grid
    if old_grid != grid:
        raise ConfigError(
            f"--resume would change the sweep grid from {old_grid} (saved in {out_dir / GRID_FILE}) "
            f"to {grid}; pass the original --grid, or sweep the new grid into a new --out"
        )
    _check_folds(_absolute_shards(cfg))
    changes = check_resume(
        config_to_dict(load_config(saved)),
        config_to_dict(cfg),
        str(saved),
        "pass the original config and overrides (the interrupted command plus --resume), or "
        "sweep the new settings into a new --out",
        safe=SWEEP_RESUME_SAFE,
    )
    if changes:
        log.info(
            "--resume: allowed config changes: %s",
            ", ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in changes),
        )
        path = out_dir / RESUME_CHANGES
        import json

        write_json(
            path,
            [
                *(json.loads(path.read_text()) if path.is_file() else []),
                {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes},
            ],
            indent=1,
        )
        save_config(cfg, out_dir)
    if address:  # the checks above name the user's mistake first; a dead address fails before Ray
        check_address(address)
    return saved


def _prepare(
    cfg: ExperimentConfig, grid: dict, out_dir: Path, models_checked: bool = False, address: str | None = None
) -> Path:
    """Save the resolved base config (absolute shard path) and validate every grid combination: its values,
    and (unless ``models_checked``) its model, built once with one forward (``training.setup.check_models``:
    an input size the model cannot take, or hub weights missing offline, fail before Ray starts)."""
    _check_folds(_absolute_shards(cfg))
    base, built = config_to_dict(cfg), []
    for c in validation_configs(grid, cfg.tune.search):  # a typo or bad value fails here, before any file exists
        tree = copy.deepcopy(base)
        for text in trial_overrides(c["overrides"], 0):
            key, value = parse_override(text)
            set_dotted(tree, key, value, "the sweep grid")
        built.append(build_config(tree))
    if not models_checked:
        from distrib.training.setup import check_models

        check_models(built)
    if address:  # after the input checks (they name the user's mistake first), before any file is written:
        check_address(address)  # a dead address fails now, where ray.init would retry it forever
    saved = out_dir / "config.yaml"
    if saved.is_file() and (out_dir / "trials").is_dir():
        # trials resume from their run dirs' checkpoints: only the same sweep may reuse them
        old_grid = read_yaml_mapping(out_dir / GRID_FILE) if (out_dir / GRID_FILE).is_file() else None
        if config_to_dict(load_config(saved)) != base or old_grid != grid:
            raise DistribError(
                f"{out_dir} already holds a sweep with a different config or grid, whose finished "
                "trials would be reused; pass --resume to continue that sweep, or choose a new --out"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / GRID_FILE, yaml.safe_dump(grid, sort_keys=False))
    return save_config(cfg, out_dir)


def _build_trainable(cfg: ExperimentConfig, spec: dict):
    from ray import tune

    resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    if cfg.tune.workers_per_trial > 1:  # the trial only drives a TorchTrainer; its workers hold the resources
        resources = {"cpu": 0.01, "gpu": 0}
    trainable = run_trial if cfg.tune.search == "grid" else run_cv_trial  # random|optuna: one trial per config
    return tune.with_resources(tune.with_parameters(trainable, spec=spec), resources)


def run_sweep(
    cfg: ExperimentConfig,
    grid: dict,
    out_dir: str | Path,
    address: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
    models_checked: bool = False,
) -> dict:
    """Run (or ``resume``) the grid x fold sweep, then summarise, pick the best config and embed it.
    ``models_checked``: the caller already built each model once (``distrib run`` does, for every expert)."""
    from ray import tune

    _import_while_ray_starts()

    out_dir = Path(out_dir).resolve()
    grid = check_grid(grid or cfg.tune.grid)
    check_search(grid, cfg.tune)
    storage_path = (
        str(Path(storage).resolve()) if storage and "://" not in storage else (storage or str(out_dir / "ray_results"))
    )
    exp_path = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
    if cfg.tune.embed_best:  # the OOF step aligns on val images: too few fails now, not after every fold trained
        from distrib.data.index import read_index
        from distrib.stacking.embed import check_val_anchors

        check_val_anchors(
            read_index(cfg.data.shards).get("split_counts", {}).get("val", 0),
            cfg.embed,
            f"{cfg.data.shards} (val split)",
        )
    reap(out_dir / PID_FILE)  # before any file is written: refuses if a live driver owns out_dir, stops orphans
    if not resume:
        check_fresh(out_dir)
    config_path = (
        _check_resume(cfg, grid, out_dir, address) if resume else _prepare(cfg, grid, out_dir, models_checked, address)
    )
    spec = {
        "folds": cfg.tune.folds,
        "sweep_dir": str(out_dir),
        "grid": grid,
        "config_path": str(config_path),
        "trials_dir": str(out_dir / "trials"),
        "workers": cfg.tune.workers_per_trial,
        "cpus": cfg.tune.cpus_per_trial,
        "gpus": cfg.tune.gpus_per_trial,
        "fail_once": os.environ.get(FAIL_ONCE_ENV, ""),
        # a retry resumes from the run dir's last_checkpoint, in the sweep dir every node reads (its trials
        # load SWEEP_DIR/config.yaml); Tune's copy of each checkpoint in --storage is opt-in: it only duplicates
        # the run dir, at the cost of a copy per epoch per trial (docs/performance-notes.md)
        "ship_checkpoints": cfg.tune.ship_checkpoints and bool(address or storage),
    }
    parent = start_parent(cfg, out_dir)  # MLflow: one parent run, each trial a child run
    spec["tracker_env"] = parent["env"] if parent else {}
    t0 = time.time()
    started = init_ray(out_dir, address, num_cpus, fork_server=cfg.tune.fork_server)
    t_ray = time.time() - t0
    sig = None
    try:
        for trial_dir in sorted((out_dir / "trials").glob("*")) if (out_dir / "trials").is_dir() else []:
            for tmp in remove_stale_tmp(trial_dir):  # no trial of this sweep runs yet: a killed write's leftover
                log.info("removed %s, a checkpoint write interrupted by a crash", tmp)
        trainable = _build_trainable(cfg, spec)
        # Tune's own logs stay (progress.csv/result.json per trial, _run_config) but not its TensorBoard copy:
        # each trial writes TensorBoard events in its run dir, so Tune's duplicated every trial under
        # `tensorboard --logdir SWEEP_DIR` and printed a logdir inside Ray's temp dir, removed after the sweep
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        if resume:
            if not tune.Tuner.can_restore(exp_path):
                raise DistribError(
                    f"--resume: no restorable Ray experiment at {exp_path}; "
                    "pass the same --out/--storage as the interrupted sweep"
                )
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            grid_mode = cfg.tune.search == "grid"
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(grid, cfg.tune.folds) if grid_mode else param_space(grid),
                tune_config=_tune_config(cfg) if grid_mode else tune_config(cfg),
                run_config=_run_config(cfg, storage_path),
            )
        results, stopped = _fit(tuner)
        t_fit = time.time() - t0 - t_ray
        errors = [str(r.error) for r in results if r.error]
        configs = None if cfg.tune.search == "grid" else sampled_configs(out_dir, results, cfg, stopped)
    except BaseException:
        finish_parent(parent, out_dir, None)  # the MLflow parent run ends FAILED, not RUNNING forever
        raise
    finally:
        if started:
            sig = stop_ray()
    summary = None
    try:
        summary = write_outputs(
            out_dir, grid, cfg, errors=errors, timing={"ray_init_s": t_ray, "fit_s": t_fit}, configs=configs
        )
        settled = summary["done"] + summary["stopped"]  # ASHA-stopped folds of a stopped config never run
        summary["status"] = (
            "interrupted" if stopped or sig else ("incomplete" if settled < summary["trials"] else "done")
        )
        summary["signal"] = int(sig or (2 if stopped else 0)) or None
    finally:
        finish_parent(parent, out_dir, summary)
    if summary["status"] == "interrupted":
        return summary  # no OOF extraction from a sweep that was stopped; --resume finishes it
    if cfg.tune.embed_best and summary.get("best"):
        from distrib.stacking.embed import extract_oof

        runs = summary["best"]["run_dirs"]
        extract_oof(runs, out_dir / "oof_embeddings.parquet", cfg.embed)
        summary["oof_embeddings"] = str(out_dir / "oof_embeddings.parquet")
    return summary


def _fit(tuner):
    """``tuner.fit()``; also says whether a SIGINT stopped it early (Tune then returns normally)."""

    def on_sigint(signum, frame):
        raise KeyboardInterrupt

    on_sigint.raises = True  # local_ray's SIGTERM handler raises Interrupted(SIGTERM) instead of calling it

    # Tune swaps in its own SIGINT handler for the run and, on the first SIGINT, puts back the one it
    # found: if ours is back in place afterwards, the run was interrupted.
    main = threading.current_thread() is threading.main_thread()
    main = main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        results = tuner.fit()
    finally:
        interrupted = main and signal.getsignal(signal.SIGINT) is on_sigint
        if main:
            signal.signal(signal.SIGINT, previous)
    return results, interrupted


def _param_space(grid: dict, folds: int) -> dict:
    from ray import tune

    return {"grid": {k: tune.grid_search(v) for k, v in grid.items()}, "fold": tune.grid_search(list(range(folds)))}


def _tune_config(cfg: ExperimentConfig):
    from ray import tune

    scheduler = None
    if cfg.tune.asha:  # biases a K-fold comparison (folds stop at different epochs): opt-in only
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(cfg.train.epochs, 1), grace_period=1)
    # metric/mode only matter to ASHA; configs are ranked afterwards by report.choose_best
    metric = {"metric": cfg.tune.metric, "mode": "max"} if scheduler else {}
    return tune.TuneConfig(
        **metric, scheduler=scheduler, max_concurrent_trials=cfg.tune.max_concurrent or None, reuse_actors=True
    )


def tune_loggers() -> list:
    """Tune's per-trial progress.csv/result.json loggers, passed explicitly (TensorBoard's is left out)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


def _run_config(cfg: ExperimentConfig, storage_path: str):
    from ray import tune

    return tune.RunConfig(
        name=EXPERIMENT,
        storage_path=storage_path,
        verbose=0,
        callbacks=tune_loggers(),
        failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
