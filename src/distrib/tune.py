"""Ray Tune sweep: one Tuner over (hyper-parameter grid x CV fold), each trial = ``distrib.train.run``.

    distrib tune launch/configs/debug.yaml --grid launch/configs/grid_debug.yaml --out runs/sweep \
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
Summaries and the best-config choice live in ``tune_report.py``.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import shlex
import tempfile
import time
from pathlib import Path

import yaml

from distrib.atomic import write_json, write_text
from distrib.config import (ConfigError, ExperimentConfig, build_config, config_to_dict, load_config,
                            parse_override, read_yaml_mapping, save_config, set_dotted)
from distrib.errors import DistribError

EXPERIMENT = "sweep"  # Ray experiment name under the storage path
GRID_FILE = "grid.yaml"  # the sweep's grid, saved beside its config.yaml
FAIL_ONCE_ENV = "DISTRIB_FAIL_ONCE"  # fault injection: path of a marker file; the first trial to report fails once


def load_grid(path: str | Path) -> dict[str, list]:
    """Read a grid YAML (``dotted.key: [values]``) and check every key against the config schema."""
    grid = read_yaml_mapping(path, "grid file", "; pass --grid with a YAML of dotted key -> list of values",
                             "dotted keys mapped to lists, e.g. 'optim.lr: [5.0e-5, 1.0e-4]'")
    if isinstance(grid.get("grid"), dict):  # also accept a 'grid:' wrapper
        grid = grid["grid"]
    return check_grid(grid, str(path))


def check_grid(grid: dict, origin: str = "tune.grid") -> dict[str, list]:
    """Validate grid shape; values are checked later by building every config."""
    out = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{origin}: '{key}' must be a non-empty list of values, got {values!r}")
        if key == "data.fold":
            raise ConfigError(f"{origin}: 'data.fold' is swept automatically (tune.folds); remove it from the grid")
        out[str(key)] = values
    return out


def _fmt(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def grid_configs(grid: dict[str, list]) -> list[dict]:
    """Cross product in a fixed order: ``[{"id": "c0", "overrides": ["optim.lr=5e-05", ...]}, ...]``."""
    keys = list(grid)
    out = []
    for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        out.append({"id": f"c{i}", "params": dict(zip(keys, values)),
                    "overrides": [f"{k}={_fmt(v)}" for k, v in zip(keys, values)]})
    return out or [{"id": "c0", "params": {}, "overrides": []}]


def config_id(grid: dict[str, list], params: dict) -> str:
    """The ``c{i}`` id of a parameter combination (its index in ``grid_configs`` order)."""
    for c in grid_configs(grid):
        if all(c["params"][k] == params.get(k) for k in c["params"]):
            return c["id"]
    raise DistribError(f"parameters {params} are not in the sweep grid {grid}")


def trial_overrides(overrides: list[str], fold: int) -> list[str]:
    return [*overrides, f"data.fold={fold}"]


def trial_command(config_path: str | Path, run_dir: str | Path, overrides: list[str]) -> str:
    """The CLI command that replays a trial by hand (``--resume`` continues it)."""
    return shlex.join(["distrib", "train", str(config_path), "--out", str(run_dir), *overrides])


# ----------------------------------------------------------------------------------------- trial side

def _log_event(run_dir: Path, event: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "trial_events.log", "a") as f:
        f.write(f"{time.time():.3f} {os.getpid()} {event}\n")


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
    t_start = time.time()
    from ray import tune

    grid, fold = spec["grid"], int(params["fold"])
    cid = config_id(grid, params.get("grid", {}))
    name = f"{cid}_fold{fold}"
    run_dir = Path(spec["trials_dir"]) / name
    overrides = trial_overrides(next(c["overrides"] for c in grid_configs(grid) if c["id"] == cid), fold)
    _log_event(run_dir, "start")
    resume = _restore_checkpoint(run_dir)
    if resume:
        _log_event(run_dir, "resume")
    from distrib import train  # lazy: torch/timm imports are the bulk of a trial's start-up

    cfg = load_config(spec["config_path"], overrides)
    t_import = time.time()
    reports = {"n": 0, "ckpt_s": 0.0, "epoch": 0}

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        t0 = time.time()
        ship = spec.get("ship_checkpoints", True) and checkpoint_dir and Path(checkpoint_dir).is_dir()
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if ship else None
        tune.report(_numeric(metrics), checkpoint=ckpt)
        reports["n"] += 1
        reports["epoch"] = int(metrics.get("epoch", reports["n"]))
        reports["ckpt_s"] += time.time() - t0
        _maybe_inject_failure(spec.get("fail_once", ""), name)

    ranks = None
    if spec.get("workers", 1) > 1:  # the workers report to Tune themselves; take their counts
        final = run_ddp_trial(spec, overrides, run_dir, resume)
        ranks = final.pop("ranks")
        reports["n"], reports["epoch"] = final.pop("reports"), final.pop("epochs")
    else:
        final = train.run(cfg, str(run_dir), resume=resume, report=report)
    t_end = time.time()
    result = {"config_id": cid, "fold": fold, "params": params.get("grid", {}), "overrides": overrides,
              "metrics": _numeric(final or {}), "reports": reports["n"], "epochs": reports["epoch"], "seconds": t_end - t_import,
              "trial_seconds": t_end - t_start, "startup_seconds": t_import - t_start,
              "report_seconds": reports["ckpt_s"], "resumed": resume, "run_dir": str(run_dir),
              "command": trial_command(spec["config_path"], run_dir, overrides),
              **({"ranks": ranks} if ranks else {})}
    write_json(run_dir / "trial_result.json", result, indent=1)
    _log_event(run_dir, "done")


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

    from distrib import train

    cfg = load_config(config["config_path"], config["overrides"])
    rank = ray.train.get_context().get_world_rank()
    counts = {"reports": 0, "epochs": 0}

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        ship = rank == 0 and config["ship_checkpoints"] and checkpoint_dir and Path(checkpoint_dir).is_dir()
        ray.train.report(_numeric(metrics), checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if ship else None)
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
        train_loop_config={"config_path": spec["config_path"], "overrides": overrides, "run_dir": str(run_dir),
                           "resume": resume, "ship_checkpoints": spec.get("ship_checkpoints", True)},
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": float(spec.get("cpus", 1.0)), "GPU": gpus}),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray_train"),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()  # raises TrainingFailedError if a worker failed
    paths = [run_dir / RANK_RESULT.format(rank=r) for r in range(workers)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DistribError(f"DDP trial {run_dir.name}: ranks finished without writing {missing}; see the Ray "
                           f"Train worker logs under {run_dir / 'ray_train'}")
    ranks = [json.loads(p.read_text()) for p in paths]
    return {**ranks[0], "ranks": [{k: r.get(k) for k in ("rank", "world_size", "backend", "steps", "param_checksum")}
                                  for r in ranks]}


# ----------------------------------------------------------------------------------------- driver side

def _short_temp_dir(out_dir: Path) -> str:
    """Ray's socket paths must stay under ~107 bytes: use the out dir or TMPDIR when short enough."""
    for base in (out_dir, Path(os.environ.get("TMPDIR", tempfile.gettempdir()))):
        if len(str(base.resolve())) <= 28:  # + ~12 (mkdtemp) + ~66 (Ray session/sockets)
            base.mkdir(parents=True, exist_ok=True)
            return tempfile.mkdtemp(prefix="ray", dir=base)
    # both are too deep (e.g. pytest's tmp dirs): Ray's own default root, /tmp, is the only short option
    return tempfile.mkdtemp(prefix="distrib-ray-", dir="/tmp")


def init_ray(out_dir: Path, address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a private local cluster; returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # num_to_keep=1 forces a state snapshot per checkpoint; that is intended, so mute Tune's warning about it
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=_short_temp_dir(out_dir),
                 log_to_driver=False)
    return True


def _check_folds(cfg: ExperimentConfig) -> None:
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty; pass data.shards=DIR (a shard dir holding index.json)")
    from distrib.loader import read_index
    k = int(read_index(cfg.data.shards)["folds"])
    if k != cfg.tune.folds:
        raise ConfigError(f"tune.folds={cfg.tune.folds} but the shards at {cfg.data.shards} have {k} folds; "
                          f"set tune.folds={k} (every fold must be swept so the OOF table is complete)")


def _prepare(cfg: ExperimentConfig, grid: dict, out_dir: Path) -> Path:
    """Save the resolved base config (absolute shard path) and validate every grid combination."""
    shards = cfg.data.shards
    if shards and "://" not in shards and not shards.startswith("pipe:"):
        cfg.data.shards = str(Path(shards).resolve())
    _check_folds(cfg)
    base = config_to_dict(cfg)
    for c in grid_configs(grid):  # a typo or bad value fails here, before any file or trial exists
        tree = copy.deepcopy(base)
        for text in trial_overrides(c["overrides"], 0):
            key, value = parse_override(text)
            set_dotted(tree, key, value, "the sweep grid")
        build_config(tree)
    saved = out_dir / "config.yaml"
    if saved.is_file() and (out_dir / "trials").is_dir():
        # trials resume from their run dirs' checkpoints: only the same sweep may reuse them
        old_grid = read_yaml_mapping(out_dir / GRID_FILE) if (out_dir / GRID_FILE).is_file() else None
        if config_to_dict(load_config(saved)) != base or old_grid != grid:
            raise DistribError(f"{out_dir} already holds a sweep with a different config or grid, whose finished "
                               "trials would be reused; pass --resume to continue that sweep, or choose a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / GRID_FILE, yaml.safe_dump(grid, sort_keys=False))
    return save_config(cfg, out_dir)


def _build_trainable(cfg: ExperimentConfig, spec: dict):
    from ray import tune

    resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    if cfg.tune.workers_per_trial > 1:  # the trial only drives a TorchTrainer; its workers hold the resources
        resources = {"cpu": 0.01, "gpu": 0}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)


def run_sweep(cfg: ExperimentConfig, grid: dict, out_dir: str | Path, address: str | None = None,
              storage: str | None = None, resume: bool = False, num_cpus: int | None = None) -> dict:
    """Run (or ``resume``) the grid x fold sweep, then summarise, pick the best config and embed it."""
    from ray import tune

    from distrib import tune_report

    out_dir = Path(out_dir).resolve()
    grid = check_grid(grid or cfg.tune.grid)
    storage_path = str(Path(storage).resolve()) if storage and "://" not in storage else (storage or str(out_dir / "ray_results"))
    exp_path = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
    if resume and not (out_dir / "config.yaml").is_file():
        raise DistribError(f"--resume: {out_dir}/config.yaml not found; start the sweep without --resume first")
    config_path = out_dir / "config.yaml" if resume else _prepare(cfg, grid, out_dir)
    cfg = load_config(config_path) if resume else cfg
    spec = {"grid": grid, "config_path": str(config_path), "trials_dir": str(out_dir / "trials"),
            "workers": cfg.tune.workers_per_trial, "cpus": cfg.tune.cpus_per_trial,
            "gpus": cfg.tune.gpus_per_trial, "fail_once": os.environ.get(FAIL_ONCE_ENV, ""),
            # a private local cluster retries trials on this machine, from the run dir's last_checkpoint;
            # only a cluster/shared storage needs each checkpoint copied into Ray's storage (measured:
            # ~4 s per slot of a 5-trial debug sweep)
            "ship_checkpoints": bool(address or storage)}
    t0 = time.time()
    started = init_ray(out_dir, address, num_cpus)
    t_ray = time.time() - t0
    try:
        trainable = _build_trainable(cfg, spec)
        if resume:
            if not tune.Tuner.can_restore(exp_path):
                raise DistribError(f"--resume: no restorable Ray experiment at {exp_path}; "
                                   "pass the same --out/--storage as the interrupted sweep")
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=_param_space(grid, cfg.tune.folds),
                               tune_config=_tune_config(cfg), run_config=_run_config(cfg, storage_path))
        results = tuner.fit()
        t_fit = time.time() - t0 - t_ray
        errors = [str(r.error) for r in results if r.error]
    finally:
        if started:
            import ray
            ray.shutdown()
    summary = tune_report.write_outputs(out_dir, grid, cfg, errors=errors,
                                        timing={"ray_init_s": t_ray, "fit_s": t_fit})
    if cfg.tune.embed_best and summary.get("best"):
        from distrib.embed import extract_oof
        runs = summary["best"]["run_dirs"]
        extract_oof(runs, out_dir / "oof_embeddings.parquet", cfg.embed)
        summary["oof_embeddings"] = str(out_dir / "oof_embeddings.parquet")
    return summary


def _param_space(grid: dict, folds: int) -> dict:
    from ray import tune
    return {"grid": {k: tune.grid_search(v) for k, v in grid.items()}, "fold": tune.grid_search(list(range(folds)))}


def _tune_config(cfg: ExperimentConfig):
    from ray import tune
    scheduler = None
    if cfg.tune.asha:  # biases a K-fold comparison (folds stop at different epochs): opt-in only
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(cfg.train.epochs, 1), grace_period=1)
    # metric/mode only matter to ASHA; configs are ranked afterwards by tune_report.choose_best
    metric = {"metric": cfg.tune.metric, "mode": "max"} if scheduler else {}
    return tune.TuneConfig(**metric, scheduler=scheduler, max_concurrent_trials=cfg.tune.max_concurrent or None, reuse_actors=True)


def _run_config(cfg: ExperimentConfig, storage_path: str):
    from ray import tune
    return tune.RunConfig(name=EXPERIMENT, storage_path=storage_path, verbose=0,
                          failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def run_sweep_cli(args) -> dict:
    """``distrib tune`` / ``tune/sweep.py``: resolve config + grid from the CLI namespace."""
    cfg = load_config(args.config, list(args.overrides or []))
    grid = load_grid(args.grid) if args.grid else check_grid(cfg.tune.grid)
    return run_sweep(cfg, grid, args.out, address=args.address, storage=args.storage,
                     resume=bool(args.resume), num_cpus=args.num_cpus)
