"""Validation across ranks and the run's evaluation outputs.

``evaluate`` gathers predictions from every rank with the loader's padding (valid=False) removed,
so each validation sample counts exactly once; metrics then come from sklearn on the gathered
arrays. The writers (val_predictions.csv, evaluation_results.json, reconstruction_samples.png)
are called on rank 0 only by the trainer.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distrib.atomic import atomic_path, json_safe, save_figure, write_json
from distrib.metrics import binary_metrics, group_metrics, metrics_at_optimal
from distrib.models.measure import cpu_latency_ms
from distrib.training.checkpoint import plain
from distrib.training.losses import positive_prob


@dataclass
class Predictions:
    """Gathered validation predictions (identical on every rank) plus the mean validation loss."""

    keys: list[str]
    groups: list[str]
    labels: np.ndarray
    probs: np.ndarray
    loss: float
    samples: dict = field(default_factory=dict)  # first batch's images/recon (for reconstruction_samples.png)

    def metrics(self) -> dict:
        return binary_metrics(self.labels, self.probs)


def _select(output, mask: torch.Tensor):
    """Rows of a model output (tensor or dict of batch tensors) where ``mask`` is True."""
    if isinstance(output, dict):
        return {
            k: (v[mask] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == mask.shape[0] else v)
            for k, v in output.items()
        }
    return output[mask]


@torch.no_grad()
def evaluate(accelerator, model, loader, loss_fn) -> Predictions:
    """Run ``loader`` through ``model`` on every rank and gather the valid rows everywhere."""
    model.eval()
    probs, labels, keys, groups, samples = [], [], [], [], {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        images = (
            loader.to_device(batch, accelerator.device)
            if hasattr(loader, "to_device")
            else batch["image"].to(accelerator.device, non_blocking=True)
        )  # normalizes on the device if deferred
        target = batch["label"].to(accelerator.device)
        valid = batch["valid"].to(accelerator.device).bool()
        with accelerator.autocast():
            output = model(images)
        if valid.any():
            loss, _ = loss_fn(_select(output, valid), target[valid], images[valid])
            loss_sum += float(loss) * int(valid.sum())
            count += int(valid.sum())
        probs.append(positive_prob(output).float()[valid].cpu())
        labels.append(target[valid].cpu())
        keys += [k for k, v in zip(batch["key"], valid.tolist()) if v]
        groups += [g for g, v in zip(batch["group"], valid.tolist()) if v]
        if not samples and isinstance(output, dict) and "recon" in output:
            samples = {"image": images[:8].float().cpu(), "recon": output["recon"][:8].float().cpu()}
    model.train()
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    local = (torch.cat(probs).numpy() if probs else np.zeros(0), torch.cat(labels).numpy() if labels else np.zeros(0))
    gathered = _gather_objects(accelerator, [(keys, groups, local[0].tolist(), local[1].tolist())])
    all_keys = [k for part in gathered for k in part[0]]
    all_groups = [g for part in gathered for g in part[1]]
    all_probs = np.asarray([p for part in gathered for p in part[2]], dtype=float)
    all_labels = np.asarray([y for part in gathered for y in part[3]], dtype=int)
    return Predictions(all_keys, all_groups, all_labels, all_probs, float(loss_sum / count.clamp(min=1)), samples)


def _gather_objects(accelerator, obj: list) -> list:
    """All ranks' lists concatenated in rank order (strings need object gathering, not tensor gather)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)


def write_predictions(path: str | Path, preds: Predictions, fold: int) -> Path:
    """val_predictions.csv (key, group, label, prob, fold): consumed by OOF/threshold fitting."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "group", "label", "prob", "fold"])
        for k, g, y, p in zip(preds.keys, preds.groups, preds.labels, preds.probs):
            w.writerow([k, g, int(y), f"{float(p):.8g}", fold])
    return Path(path)


@torch.inference_mode()
def write_evaluation_results(
    path: str | Path,
    preds: Predictions,
    *,
    model: torch.nn.Module,
    model_file: Path,
    img_size: int,
    latency_repeats: int,
    runtime: dict,
    best: dict,
    group_agg: str = "none",
) -> dict:
    """evaluation_results.json: metrics at 0.5 and at the val-optimal threshold, latency, size, runtime;
    with ``group_agg`` mean/max also ``group_metrics`` (AUC/EER/AP of per-group scores)."""
    result = {
        "metrics_at_0.5": binary_metrics(preds.labels, preds.probs, 0.5),
        "metrics_at_optimal": metrics_at_optimal(preds.labels, preds.probs),
        "val_loss": preds.loss,
        "num_val_samples": int(len(preds.labels)),
        "latency_ms_per_img_cpu_bs1": cpu_latency_ms(model, img_size, latency_repeats),
        "img_size": img_size,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "model_file_mb": round(model_file.stat().st_size / 2**20, 3) if model_file.is_file() else None,
        "best": best,
        **runtime,
    }
    result["optimal_threshold"] = result["metrics_at_optimal"]["threshold"]
    if group_agg != "none":
        result["group_metrics"] = group_metrics(preds.groups, preds.labels, preds.probs, group_agg)
    result = json_safe(plain(result))
    write_json(path, result)
    return result


def save_reconstruction_samples(path: str | Path, samples: dict) -> Path | None:
    """Inputs (top row) above their reconstructions (bottom row), each min-max scaled for display."""
    if not samples:
        return None
    import matplotlib.pyplot as plt

    images, recon = samples["image"], samples["recon"]
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for row, data, title in ((0, images, "input"), (1, recon, "reconstruction")):
        for i in range(n):
            x = data[i].permute(1, 2, 0).numpy()
            x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
            axes[row][i].imshow(x)
            axes[row][i].axis("off")
        axes[row][0].set_title(title, fontsize=8, loc="left")
    return save_figure(fig, path)
