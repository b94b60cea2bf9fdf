"""`distrib bench latency`: CPU ms/img at batch 1 and model MB for every seed model, as a ratio to a
ResNet50 measured in the same run (the pit plan's reference is a 16 ms ResNet50).

    distrib bench latency                          # all seed models, 20 timed repeats each
    distrib bench latency repeats=5 threads=1 models=resnet50.a1_in1k,efficientnet_b2.ra_in1k

Weights are random (no downloads); latency does not depend on weight values. On a shared, loaded
machine use threads=1: OpenMP threads competing with other processes for cores inflate a 2-thread
ResNet50 from ~130 ms to ~800 ms here, which measures the load, not the model.
"""

from __future__ import annotations

import os
import statistics

import torch
from tqdm import tqdm

from distrib.config import ConfigError, ModelConfig
from distrib.models.measure import forward_ms, model_size_mb

BASELINE = "resnet50.a1_in1k"
REFERENCE_RESNET50_MS = 16.0  # the pit plan's ResNet50 latency target
WARMUP = 3  # untimed forward passes per model before timing

# name -> (input px, extra ModelConfig fields): each seed model at the size its experiment trains at.
SEED_MODELS: dict[str, tuple[int, dict]] = {
    "mobilenetv4_conv_small.e2400_r224_in1k": (224, {}),
    "tf_efficientnetv2_b3.in21k_ft_in1k": (256, {}),
    BASELINE: (128, {}),
    "convnextv2_tiny.fcmae_ft_in1k": (128, {}),
    "efficientnet_b2.ra_in1k": (128, {}),
    "vit_small_patch14_dinov2.lvd142m": (126, {"img_size": 126}),
    # full paper backbones: convnext_tiny + swin_tiny, each run on the input and its reconstruction
    "genconvit_ed": (224, {"img_size": 224}),
    "genconvit_vae": (224, {"img_size": 224}),
}


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _parse(overrides) -> tuple[int, int, list[str]]:
    repeats, threads, names = 20, _available_cores(), list(SEED_MODELS)
    for text in overrides or ():
        key, _, value = text.partition("=")
        if key == "repeats" and value.isdigit() and int(value) >= 1:
            repeats = int(value)
        elif key == "threads" and value.isdigit() and int(value) >= 1:
            threads = int(value)
        elif key == "models" and value:
            names = [n for n in value.split(",") if n]
            unknown = [n for n in names if n not in SEED_MODELS]
            if unknown:
                raise ConfigError(f"bench latency: unknown model(s) {unknown}; choose from {', '.join(SEED_MODELS)}")
        else:
            raise ConfigError(
                f"bench latency: bad option '{text}'; use repeats=N, threads=N (N >= 1) "
                f"and/or models=name1,name2 (seed model names)"
            )
    if BASELINE not in names:
        names.insert(0, BASELINE)  # the ratio needs the baseline from the same run
    return repeats, threads, names


def run(overrides=()) -> dict:
    """Time every requested seed model; ``run_bench`` prints the returned dict as the last line."""
    from distrib.models import build_model

    repeats, threads, names = _parse(overrides)
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.manual_seed(0)
    models, inputs, rows = {}, {}, {}
    for name in names:
        size, extra = SEED_MODELS[name]
        models[name] = build_model(ModelConfig(name=name, num_classes=1, **extra)).eval()
        inputs[name] = torch.randn(1, 3, size, size)
        rows[name] = dict(
            img_size=size,
            mb=round(model_size_mb(models[name]), 1),
            params_m=round(sum(p.numel() for p in models[name].parameters()) / 1e6, 2),
        )
    # Round-robin: every round times each model once, so load from other processes drifting over the
    # run hits all models (and the ResNet50 baseline) alike instead of skewing whichever ran last.
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(WARMUP):
                models[name](inputs[name])
        for _ in tqdm(range(repeats), desc="latency rounds", leave=False):
            for name in names:
                times[name].append(forward_ms(models[name], inputs[name]))
    for name in names:
        rows[name].update(ms_per_img=round(statistics.median(times[name]), 2), ms_min=round(min(times[name]), 2))
        r = rows[name]
        print(
            f"{name:42s} {r['img_size']:4d}px {r['ms_per_img']:9.2f} ms/img (min {r['ms_min']:.2f}) {r['mb']:8.1f} MB",
            flush=True,
        )
    base = rows[BASELINE]["ms_per_img"]
    for row in rows.values():
        row["ratio_to_resnet50"] = round(row["ms_per_img"] / base, 3)
    return dict(
        bench="latency",
        device="cpu",
        threads=threads,
        cores=_available_cores(),
        load_avg_1min=load_before,
        batch=1,
        repeats=repeats,
        warmup=WARMUP,
        baseline=BASELINE,
        baseline_ms=base,
        reference_resnet50_ms=REFERENCE_RESNET50_MS,
        baseline_vs_reference=round(base / REFERENCE_RESNET50_MS, 3),
        ratio_to_resnet50={n: r["ratio_to_resnet50"] for n, r in rows.items()},
        models=rows,
    )
