"""The one training function, reached by `accelerate launch launch/train.py`, `distrib train` and Tune trials.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 launch/train.py \\
        launch/configs/experiments/debug.yaml --out runs/debug data.shards=shards/

``run(cfg, out_dir)`` validates everything it can before the process group starts, builds the
pieces (``setup.build_trainer``), then runs a loop that never asks which rank it is on: rank-0-only
work goes through ``RunLogger`` / ``dist`` helpers, metrics through gathered predictions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distrib.config import ExperimentConfig, config_to_dict
from distrib.metrics import group_metrics
from distrib.runs import LAST, load_best, model_from_payload, param_checksum
from distrib.training import dist
from distrib.training.checkpoint import save_best, save_checkpoint
from distrib.training.evaluate import evaluate, save_reconstruction_samples, write_evaluation_results, write_predictions
from distrib.training.setup import build_trainer, preflight
from distrib.training.state import Trainer

Report = Callable[[dict, str], None]


def run(cfg: ExperimentConfig, out_dir: str | Path, resume: bool = False, report: Report | None = None) -> dict:
    """Train ``cfg`` into ``out_dir``; return the best validation metrics (plus what really ran).

    ``report(metrics, checkpoint_dir)`` is called on every rank after each evaluation, once the
    checkpoint it names is complete (Ray Tune uses it).
    """
    out = Path(out_dir)
    model = preflight(cfg, out, resume)  # config/data/model errors surface before any process group
    accelerator = dist.build_accelerator(cfg)
    try:
        t = build_trainer(cfg, out, accelerator, model, resume)
        while t.epoch < cfg.train.epochs and not t.done:
            train_epoch(t)
            t.epoch, t.pos = t.epoch + 1, 0
            last = t.done or t.epoch == cfg.train.epochs
            if t.epoch % cfg.train.eval_every_epochs == 0 or last:
                _validate(t, report)
            else:
                _checkpoint(t)
        result = _finish(t)
    except BaseException:
        dist.finish(accelerator, ok=False)
        raise
    dist.finish(accelerator)
    return result


def train_epoch(t: Trainer) -> None:
    """One epoch (or its remainder after a resume); the loop body of the trainer."""
    acc, cfg = t.accelerator, t.cfg
    batches = t.epoch_batches()  # resumes mid-epoch by skipping the batches already consumed
    t.log.start_epoch(t.epoch, t.steps_per_epoch, initial=t.pos // cfg.train.grad_accum)
    tick, images_seen = time.perf_counter(), 0
    for batch in batches:
        images, target = t.to_device(batch)
        with acc.accumulate(t.model):
            loss, _ = t.compute_loss(t.model(images), target, images)
            acc.backward(loss)
            if acc.sync_gradients and cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(t.model.parameters(), cfg.optim.grad_clip)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
        t.pos, t.loss_sum, t.loss_count = t.pos + 1, t.loss_sum + loss.detach().double(), t.loss_count + 1
        images_seen += images.shape[0] * acc.num_processes
        if not acc.sync_gradients:
            continue
        t.step += 1
        t.scheduler.step_update(t.step)  # the lr of the next step
        t.log.advance(1)
        if t.step % cfg.train.log_every_steps == 0:
            now = time.perf_counter()
            t.log.scalars(
                t.step,
                {
                    "train/loss": float(loss.detach()),
                    "train/lr": t.lr(),
                    "train/images_per_s": images_seen / max(now - tick, 1e-9),
                },
            )
            tick, images_seen = now, 0
        if cfg.train.max_steps and t.step >= cfg.train.max_steps:
            t.done = True
            break
        if cfg.train.ckpt_every_steps and t.step % cfg.train.ckpt_every_steps == 0 and t.pos < t.micro_per_epoch:
            _checkpoint(t)
    t.end_epoch()


def _validate(t: Trainer, report: Report | None) -> None:
    """Evaluate, log a CSV/TensorBoard row, keep the best model by val AUC, checkpoint, report."""
    acc = t.accelerator
    dist.sync_buffers(acc, t.model)  # every rank evaluates the weights best_model.pth will hold
    preds = evaluate(acc, t.model, t.val_loader, t.loss_fn)
    m = preds.metrics()
    if t.cfg.eval.group_agg != "none":  # video/photo/item level next to sample level
        g = group_metrics(preds.groups, preds.labels, preds.probs, t.cfg.eval.group_agg)
        m.update({f"group_{k}": g[k] for k in ("auc", "eer", "ap")})
    total = acc.reduce(
        torch.stack([t.loss_sum.clone(), torch.tensor(float(t.loss_count), dtype=torch.float64, device=acc.device)]),
        "sum",
    )
    train_loss = float(total[0] / total[1].clamp(min=1))
    t.loss_sum, t.loss_count = torch.zeros_like(t.loss_sum), 0
    row = {
        "epoch": t.epoch,
        "step": t.step,
        "lr": t.lr(),
        "train_loss": train_loss,
        "val_loss": preds.loss,
        **{k: m[k] for k in ("auc", "f1", "accuracy", "precision", "recall", "specificity", "eer", "ap")},
        "seconds": t.elapsed(),
        **{k: v for k, v in m.items() if k.startswith("group_")},
    }
    t.log.epoch_row(row)
    auc = -math.inf if math.isnan(m["auc"]) else m["auc"]
    state_dict = dist.state_dict(acc, t.model) if auc > t.best_auc or t.best_epoch < 0 else None  # collective
    if state_dict is not None:
        t.best_auc, t.best_epoch = auc, t.epoch
        t.best_metrics = {**m, "val_loss": preds.loss, "train_loss": train_loss, "epoch": t.epoch, "step": t.step}
        dist.on_main(save_best, t.out / "best_model.pth", state_dict, config_to_dict(t.cfg), t.best_metrics)
        dist.on_main(write_predictions, t.out / "val_predictions.csv", preds, t.cfg.data.fold)
    if preds.samples:
        dist.on_main(save_reconstruction_samples, t.out / "reconstruction_samples.png", preds.samples)
    _checkpoint(t)
    if report is not None:
        report(
            {
                "epoch": t.epoch,
                "step": t.step,
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in row.items() if k not in ("epoch", "step", "lr", "train_loss", "seconds")},
                "best_val_auc": t.best_auc,
            },
            str(t.out / LAST),
        )


def _checkpoint(t: Trainer) -> None:
    save_checkpoint(t.accelerator, t.out / LAST, t.model, t.optimizer, t.trainer_state(), t.rank_state())


def _finish(t: Trainer) -> dict:
    """evaluation_results.json from the best model's saved predictions; per-rank weight checksums."""
    from distrib.data.index import read_index
    from distrib.data.verify import class_mapping

    acc = t.accelerator
    runtime = {
        **dist.runtime_info(acc),
        "skipped_samples": t.skipped_counts(),
        **class_mapping(read_index(t.cfg.data.shards)),
    }  # which class is positive (label 1)
    if any(runtime["skipped_samples"].values()):
        dist.print0(
            f"warning: the loader skipped corrupt samples: {runtime['skipped_samples']} (see the loader "
            "warnings above; run 'distrib shard inspect' on data.shards)"
        )
    result = {
        **t.best_metrics,
        **runtime,
        "best_epoch": t.best_epoch,
        "steps": t.step,
        "param_checksum": param_checksum(dist.unwrap(acc, t.model, keep_torch_compile=False)),
    }
    dist.on_main(_write_final_outputs, t, runtime)
    t.log.close()
    dist.print_all("final", {k: result[k] for k in ("world_size", "backend", "steps", "param_checksum")})
    _check_skipped(t, runtime["skipped_samples"])
    return result


def _check_skipped(t: Trainer, skipped: dict) -> None:
    """Fail (after writing the outputs) when more than train.max_skipped_fraction of a split was skipped."""
    from distrib.errors import DataError

    tc = t.cfg.train
    read = {
        "train": skipped["train"] + t.step * tc.grad_accum * t.cfg.data.batch_size * t.accelerator.num_processes,
        "val": t.val_loader.stream.plan.total,
    }
    for split, n in skipped.items():
        if n > tc.max_skipped_fraction * max(read[split], 1):
            raise DataError(
                f"the loader skipped {n} corrupt {split} samples of {read[split]} read "
                f"({n / max(read[split], 1):.1%} > train.max_skipped_fraction={tc.max_skipped_fraction}); "
                f"the metrics in {t.out} are not trustworthy: run 'distrib shard inspect "
                f"{t.cfg.data.shards}' and re-shard, or raise train.max_skipped_fraction"
            )


def _write_final_outputs(t: Trainer, runtime: dict) -> None:
    """evaluation_results.json of the best model (re-read from best_model.pth) and training_curves.png."""
    payload = load_best(t.out / "best_model.pth")
    model, _, _ = model_from_payload(payload)
    preds = _read_predictions(t.out / "val_predictions.csv", payload["metrics"].get("val_loss", math.nan))
    write_evaluation_results(
        t.out / "evaluation_results.json",
        preds,
        model=model,
        model_file=t.out / "best_model.pth",
        img_size=t.cfg.data.img_size,
        latency_repeats=t.cfg.train.latency_batches,
        runtime=runtime,
        best={"epoch": t.best_epoch, "auc": t.best_auc, "step": payload["metrics"].get("step")},
        group_agg=t.cfg.eval.group_agg,
    )
    t.log.plot_curves()


def _read_predictions(path: Path, loss: float):
    import pandas as pd

    from distrib.training.evaluate import Predictions

    df = pd.read_csv(path, dtype={"key": str, "group": str}, keep_default_na=False)
    return Predictions(
        df["key"].tolist(), df["group"].tolist(), df["label"].to_numpy(int), df["prob"].to_numpy(float), float(loss)
    )


__all__ = ["run"]
