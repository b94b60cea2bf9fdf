"""`distrib bench sweep`: a K=5 debug sweep on S=2 slots, on 1 node and on 2 nodes, wall time vs the ideal.

    distrib bench sweep [--config launch/configs/experiments/debug.yaml] [--out /tmp/bench_sweep] [--workers 2] [overrides]

Ideal schedule: K trials on S slots take ceil(K/S) rounds, so ideal = ceil(K/S) x the single-trial time
(the median of the trials' own ``train.run`` seconds, without checkpoint I/O): trials cannot be split, so
K/S would be unreachable. The measured wall time is Ray start/connect + ``Tuner.fit``. Three layouts:

- ``one_node`` (the top-level keys): a private local cluster with S CPUs (``run_sweep(num_cpus=S)``).
- ``one_node_cluster``: ``ray start --head`` with S CPUs, already up and idle (its fork server has imported),
  as a team shares one between sweeps; the sweep connects with ``--address`` and writes Ray's state to
  ``--storage``. Wall time = connect + fit; the node's start-up is reported as ``cluster_start_s``.
- ``two_nodes``: the same with ceil(S/2) CPUs on the head plus a worker node (``ray start --address``) with
  the rest, on this host (``sweep.ray_nodes``).

All run with a trial fork server (``sweep.zygote``: trials fork from a process that imported torch/timm,
started with the private cluster or with each ``ray start`` node). ``no_fork_server`` repeats ``one_node`` and
``two_nodes`` without it, in the same run, and ``fork_server_speedup`` is its wall time / the fork server's.

Each ``ray start`` layout also runs K no-op trials on the same cluster (``tune_floor_s``: connect + fit,
what Ray Tune itself costs, nothing to train) and reports ``ratio_net_of_tune_floor`` = (wall - that) /
ideal; ``ratio_to_ideal`` and ``target_met`` stay the figures judged.

The breakdown attributes the gap: Ray start-up, per-trial start-up (imports, config, checkpoint restore; from
each trial's own clock), checkpoint I/O (``tune.report`` with a checkpoint), and the rest (scheduling,
actor creation, experiment-state snapshots, idle slots at the tail). Target: ratio_to_ideal <= 1.15.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

FOLDS = 5
IDEAL = "ceil(trials / slots) x median trial train.run seconds"
TARGET = 1.15  # ratio_to_ideal, for each layout


def _shards(root: Path) -> Path:
    from distrib.data.shards import write_shards
    from distrib.demo.data import build_demo_dataset

    data, shards = root / "data", root / "shards"
    if not (shards / "index.json").is_file():
        build_demo_dataset(data, size="tiny", seed=0, overwrite=True)
        write_shards(
            data / "train_manifest.csv",
            shards,
            val=data / "val_manifest.csv",
            test=data / "test_manifest.csv",
            folds=FOLDS,
            seed=0,
            shard_size=30,
            workers=1,
            overwrite=True,
        )
    return shards


def ideal_seconds(trial_s: list[float], slots: int) -> float:
    """The ideal schedule: ceil(K / S) rounds of the median trial (trials cannot be split across slots)."""
    return math.ceil(len(trial_s) / slots) * statistics.median(trial_s)


def _measure(cfg, sweep_dir: Path, slots: int, **ray_args) -> dict:
    """Run the sweep; wall time vs ceil(K/S) x the median trial, and where the rest went."""
    from distrib.sweep.driver import run_sweep

    shutil.rmtree(sweep_dir, ignore_errors=True)
    res = run_sweep(cfg, {}, sweep_dir, **ray_args)
    wall = res["ray_init_s"] + res["fit_s"]
    trials = [json.loads(p.read_text()) for p in sorted((sweep_dir / "trials").glob("*/trial_result.json"))]
    if len(trials) != FOLDS:
        from distrib.errors import DistribError

        raise DistribError(f"bench sweep: only {len(trials)} of {FOLDS} trials finished; see {sweep_dir}")
    train = [t["seconds"] - t["report_seconds"] for t in trials]
    ideal = ideal_seconds(train, slots)
    startup = sum(t["startup_seconds"] for t in trials) / slots
    ckpt = sum(t["report_seconds"] for t in trials) / slots
    ratio = round(wall / ideal, 3)  # target_met judges the printed figure
    return {
        "wall_s": round(wall, 2),
        "ideal_s": round(ideal, 2),
        "ratio_to_ideal": ratio,
        "target_met": ratio <= TARGET,
        "overhead_s": {
            "ray_start": round(res["ray_init_s"], 2),
            "trial_startup_per_slot": round(startup, 2),
            "checkpoint_io_per_slot": round(ckpt, 2),
            "other": round(wall - ideal - res["ray_init_s"] - startup - ckpt, 2),
        },
        "trial_train_s": [round(s, 2) for s in train],
        "trial_startup_s": [round(t["startup_seconds"], 2) for t in trials],
        "nodes": len({t.get("node_id") for t in trials}),
        "sweep_dir": str(sweep_dir),
    }


def _noop_trial(config: dict) -> None:
    from ray import tune

    tune.report({"fold": config["fold"]})


def tune_floor(address: str, root: Path) -> float:
    """Connect + ``Tuner.fit`` of K no-op trials (1 CPU each, reuse_actors, the sweep's loggers) on the
    cluster at ``address``: what Ray Tune itself costs a K-trial sweep there, with nothing to train."""
    import os

    from ray import tune

    from distrib.sweep.driver import tune_loggers
    from distrib.sweep.local_ray import start_ray, stop_ray

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    start_ray(root, address, None)
    try:
        tune.Tuner(
            tune.with_resources(_noop_trial, {"cpu": 1}),
            param_space={"fold": tune.grid_search(list(range(FOLDS)))},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(
                name="noop", storage_path=str(root / "storage"), verbose=0, callbacks=tune_loggers()
            ),
        ).fit()
        return time.time() - t0
    finally:
        stop_ray()


def _cluster(cfg, root: Path, slots: int, nodes: int = 2, fork_server: bool = True) -> dict:
    """The same sweep on a cluster started with `ray start` (stopped by PID afterwards): a head alone with S
    CPUs (``nodes=1``), or a head with ceil(S/2) CPUs plus a worker node with the rest (``nodes=2``)."""
    from distrib.sweep import zygote
    from distrib.sweep.local_ray import _temp_dir
    from distrib.sweep.ray_nodes import add_worker, start_head, stop_cluster

    t0 = time.time()
    cluster = {"temp_dir": _temp_dir()}
    try:
        head_cpus = slots if nodes == 1 else max(1, math.ceil(slots / 2))
        cluster = start_head(
            None, head_cpus, temp_dir=cluster["temp_dir"], log=root / f"ray_{nodes}node.log", fork_server=fork_server
        )
        servers = [cluster["fork_server"]]
        if nodes > 1 and slots > 1:
            servers.append(add_worker(cluster, slots - head_cpus, fork_server=fork_server)["fork_server"])
        for sock in filter(None, servers):  # an idle cluster: its fork servers have finished their imports
            zygote.wait_ready(sock)
        started = time.time() - t0
        name = f"sweep_{nodes}node{'s' if nodes > 1 else ''}" + ("" if fork_server else "_no_fork_server")
        out = _measure(cfg, root / name, slots, address=cluster["address"], storage=str(root / f"storage_{name}"))
        floor = tune_floor(cluster["address"], root / f"{name}_tune_floor") if fork_server else None
    finally:
        stop_cluster(cluster)
    if floor is not None:  # Ray Tune's own cost on this cluster, and the ratio without it
        out.update(
            tune_floor_s=round(floor, 2), ratio_net_of_tune_floor=round((out["wall_s"] - floor) / out["ideal_s"], 3)
        )
    return {**out, "cluster_start_s": round(started, 2)}


def run(config: str | None = None, out: str | None = None, workers: int = 2, overrides=()) -> dict:
    from distrib.config import load_config

    repo = Path(__file__).resolve().parents[3]
    config = config or str(repo / "launch" / "configs" / "experiments" / "debug.yaml")
    root = Path(out or tempfile.mkdtemp(prefix="bench_sweep"))
    slots = max(1, int(workers or 2))
    shards = _shards(root)
    cfg = load_config(
        config,
        [
            f"data.shards={shards}",
            f"tune.folds={FOLDS}",
            "tune.cpus_per_trial=1",
            "tune.embed_best=false",
            "train.epochs=2",
            "data.samples_per_epoch=64",
            "train.latency_batches=1",
            *list(overrides or []),
        ],
    )
    cold = copy.deepcopy(cfg)
    cold.tune.fork_server = False
    t0 = time.time()
    one = _measure(cfg, root / "sweep", slots, num_cpus=slots)
    one_cluster = _cluster(cfg, root, slots, nodes=1)
    two = _cluster(cfg, root, slots, nodes=2)
    # the baseline, same run: every trial process imports torch/timm itself (no sweep.zygote)
    one_cold = _measure(cold, root / "sweep_no_fork_server", slots, num_cpus=slots)
    two_cold = _cluster(cfg, root, slots, nodes=2, fork_server=False)
    return {
        "bench": "sweep",
        "trials": FOLDS,
        "slots": slots,
        "ideal": IDEAL,
        **one,
        "target_ratio": TARGET,
        "one_node_cluster": one_cluster,
        "two_nodes": two,
        "no_fork_server": {"one_node": one_cold, "two_nodes": two_cold},
        "fork_server_speedup": {
            "one_node": round(one_cold["wall_s"] / one["wall_s"], 3),
            "two_nodes": round(two_cold["wall_s"] / two["wall_s"], 3),
        },
        "total_s": round(time.time() - t0, 2),
    }
