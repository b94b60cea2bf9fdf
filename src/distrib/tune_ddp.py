"""A Tune trial that trains with DDP inside it: ``tune.workers_per_trial > 1`` -> Ray Train TorchTrainer.

Ray 2.60 uses Ray Train V2, where a Trainer is no longer passed to ``Tuner``; instead the Tune
function trainable (``tune.run_trial``) builds and fits a ``TorchTrainer`` and forwards its reports to
Tune with ``ray.tune.integration.ray_train.TuneReportCallback``. Ray Train starts the workers, sets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and the process group; accelerate (inside ``train.run``) picks
that environment up, so each worker runs the very same ``train.run``. Every rank calls
``ray.train.report`` (V2 requires all ranks); only rank 0 attaches the checkpoint directory.
The trial itself holds almost no resources; the workers hold cpus_per_trial/gpus_per_trial each.
Status: exercised by hand only; on a 2-core CPU box a 2-worker trial inside a 2-CPU sweep cannot run
beside other trials, so the test suite covers the single-worker path.
"""
from __future__ import annotations

from pathlib import Path


def _worker_loop(config: dict) -> None:
    import ray.train

    from distrib import train
    from distrib.config import load_config
    from distrib.tune import _numeric

    cfg = load_config(config["config_path"], config["overrides"])
    rank0 = ray.train.get_context().get_world_rank() == 0

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if rank0 and checkpoint_dir else None
        ray.train.report(_numeric(metrics), checkpoint=ckpt)

    train.run(cfg, config["run_dir"], resume=config["resume"], report=report)


def run_ddp_trial(spec: dict, overrides: list[str], run_dir: Path, resume: bool) -> dict:
    """Fit a TorchTrainer of ``spec['workers']`` DDP workers; returns the last reported metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpus = float(spec.get("gpus", 0.0))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config_path": spec["config_path"], "overrides": overrides,
                           "run_dir": str(run_dir), "resume": resume},
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=int(spec["workers"]), use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": float(spec.get("cpus", 1.0)), "GPU": gpus}),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray_train"),
                             callbacks=[TuneReportCallback()]),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
