"""`distrib bench sweep`: a K=5 debug sweep on 2 parallel slots, wall time vs the ideal schedule.

    distrib bench sweep [--config launch/configs/experiments/debug.yaml] [--out /tmp/bench_sweep] [--workers 2] [overrides]

Ideal = sum of the trials' own ``train.run`` seconds / slots (perfect packing, zero overhead). The
measured wall time is Ray start-up + ``Tuner.fit``. The breakdown attributes the gap: Ray start-up,
per-trial start-up (imports, config, checkpoint restore; from each trial's own clock), checkpoint I/O
(``tune.report`` with a checkpoint, which copies it to storage), and the rest (scheduling, actor
creation, experiment-state snapshots, idle slots at the tail). Target: ratio_to_ideal <= 1.15.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

FOLDS = 5


def _shards(root: Path) -> Path:
    from distrib.demo.data import build_demo_dataset
    from distrib.data.shards import write_shards

    data, shards = root / "data", root / "shards"
    if not (shards / "index.json").is_file():
        build_demo_dataset(data, size="tiny", seed=0, overwrite=True)
        write_shards(data / "train_manifest.csv", shards, val=data / "val_manifest.csv",
                     test=data / "test_manifest.csv", folds=FOLDS, seed=0, shard_size=30, workers=1, overwrite=True)
    return shards


def run(config: str | None = None, out: str | None = None, workers: int = 2, overrides=()) -> dict:
    from distrib.config import load_config
    from distrib.sweep.driver import run_sweep

    repo = Path(__file__).resolve().parents[3]
    config = config or str(repo / "launch" / "configs" / "experiments" / "debug.yaml")
    root = Path(out or tempfile.mkdtemp(prefix="bench_sweep"))
    slots = max(1, int(workers or 2))
    shards = _shards(root)
    sweep_dir = root / "sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)
    cfg = load_config(config, [f"data.shards={shards}", f"tune.folds={FOLDS}", "tune.cpus_per_trial=1",
                               "tune.embed_best=false", "train.epochs=2", "data.samples_per_epoch=64",
                               "train.latency_batches=1", *list(overrides or [])])
    t0 = time.time()
    res = run_sweep(cfg, {}, sweep_dir, num_cpus=slots)
    wall = res["ray_init_s"] + res["fit_s"]
    trials = [json.loads(p.read_text()) for p in sorted((sweep_dir / "trials").glob("*/trial_result.json"))]
    if len(trials) != FOLDS:
        from distrib.errors import DistribError
        raise DistribError(f"bench sweep: only {len(trials)} of {FOLDS} trials finished; see {sweep_dir}")
    train_s = sum(t["seconds"] - t["report_seconds"] for t in trials)
    ideal = train_s / slots
    startup = sum(t["startup_seconds"] for t in trials) / slots
    ckpt = sum(t["report_seconds"] for t in trials) / slots
    result = {
        "bench": "sweep", "trials": len(trials), "slots": slots,
        "wall_s": round(wall, 2), "ideal_s": round(ideal, 2), "ratio_to_ideal": round(wall / ideal, 3),
        "target_ratio": 1.15,
        "overhead_s": {"ray_start": round(res["ray_init_s"], 2), "trial_startup_per_slot": round(startup, 2),
                       "checkpoint_io_per_slot": round(ckpt, 2),
                       "other": round(wall - ideal - res["ray_init_s"] - startup - ckpt, 2)},
        "trial_train_s": [round(t["seconds"] - t["report_seconds"], 2) for t in trials],
        "trial_startup_s": [round(t["startup_seconds"], 2) for t in trials],
        "total_s": round(time.time() - t0, 2), "sweep_dir": str(sweep_dir),
    }
    return result
