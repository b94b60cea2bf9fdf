"""What a model costs to deploy: CPU latency at batch 1 and serialized size.

One implementation for every run's evaluation_results.json, ``distrib bench latency`` and exports.
"""

from __future__ import annotations

import io
import statistics
import time

import torch
import torch.nn as nn


def forward_ms(model: nn.Module, x: torch.Tensor) -> float:
    """Wall time of one forward pass, in ms."""
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1000.0


def cpu_latency_ms(model: nn.Module, img_size: int, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in ms of a batch-1 eval forward on CPU (after ``warmup`` untimed passes).

    NaN when ``repeats`` is 0 (latency measurement switched off). The model's train/eval mode is kept.
    """
    if repeats <= 0:
        return float("nan")
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, img_size, img_size)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = [forward_ms(model, x) for _ in range(repeats)]
    model.train(was_training)
    return float(statistics.median(times))


def model_size_mb(model: nn.Module) -> float:
    """Size of the serialized state dict (what best_model.pth holds for weights), in MiB."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 2**20
