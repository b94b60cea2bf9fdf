"""`distrib bench trainer`: the full trainer's step loop vs a bare torch loop, same model and batches.

    distrib bench trainer [--config launch/configs/experiments/debug.yaml] [--steps 20] [--vs timm] [overrides]
    # 2 processes (both loops DDP over gloo):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 .venv/bin/distrib bench trainer

Both loops train the same freshly seeded model on the same batches already in memory, in the same
process (so the same process count). The trainer side is the real ``train.train_epoch`` (accumulate,
backward, clipping, scheduler, TensorBoard/tqdm logging) fed by an in-memory batch list instead of
shards. Rounds alternate between the two to share the noise of a busy machine; the reported ratio
is bare-loop time / trainer time per step (1.0 = no overhead; target >= 0.95).

``--vs timm`` adds a third loop, timm's own training step as its ``train.py`` runs it (autocast for
``train.mixed_precision``, ``timm.utils.NativeScaler`` for fp16, ``timm.utils.dispatch_clip_grad`` for
``optim.grad_clip``, channels_last when configured), same model, batches, optimizer and precision:
``timm_images_per_s`` and ``ratio_to_timm`` (timm time / trainer time per step). On CPU here; the GPU
figures come from the same command on a GPU machine.

On CUDA each loop also reports its peak GPU memory (``torch.cuda.max_memory_allocated`` after a reset,
``*_peak_gpu_mib``) at the configured batch size, so the plan's batch sizes can be checked per model.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distrib.config import load_config

ROUNDS = 4
TARGET = 0.95  # ratio_to_bare_loop: distrib's step costs at most ~5 % over a bare torch loop


def _batches(cfg, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    b, s = cfg.data.batch_size, cfg.data.img_size
    return [
        {
            "image": torch.randn(b, 3, s, s, generator=g),
            "label": torch.randint(0, 2, (b,), generator=g),
            "key": [f"k{i}" for i in range(b)],
            "group": ["g"] * b,
            "valid": torch.ones(b, dtype=torch.bool),
        }
        for _ in range(steps)
    ]


def _bare_loop(model, batches, cfg, device) -> float:
    """The minimal loop: forward, BCE/CE, backward, optimizer step. Seconds per step.

    The optimizer is the trainer's own (same class, param groups and hyper-parameters), so the ratio
    measures the loop machinery (accelerate wrappers, scheduler, logging), not an optimizer choice.
    """
    from distrib.training.optim import build_optimizer

    opt = build_optimizer(model.module if hasattr(model, "module") else model, cfg.optim)
    loss_fn = torch.nn.BCEWithLogitsLoss() if cfg.model.num_classes == 1 else torch.nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        x, y = batch["image"].to(device), batch["label"].to(device)
        out = model(x)
        out = out["logits"] if isinstance(out, dict) else out
        loss = loss_fn(out[:, 0], y.float()) if cfg.model.num_classes == 1 else loss_fn(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def _timm_loop(model, batches, cfg, device) -> float:
    """timm's train.py step (its loss scaler and clipping helpers) over the same batches. Seconds per step."""
    from timm.utils import NativeScaler, dispatch_clip_grad

    from distrib.training.optim import build_optimizer

    opt = build_optimizer(model.module if hasattr(model, "module") else model, cfg.optim)
    loss_fn = torch.nn.BCEWithLogitsLoss() if cfg.model.num_classes == 1 else torch.nn.CrossEntropyLoss()
    precision = cfg.train.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = NativeScaler(device=device.type) if precision == "fp16" else None
    clip = cfg.optim.grad_clip or None
    memory = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        x = batch["image"].to(device).contiguous(memory_format=memory)
        y = batch["label"].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
            out = out["logits"] if isinstance(out, dict) else out
            loss = loss_fn(out[:, 0], y.float()) if cfg.model.num_classes == 1 else loss_fn(out, y)
        opt.zero_grad()
        if scaler is not None:
            scaler(loss, opt, clip_grad=clip, parameters=model.parameters())
        else:
            loss.backward()
            if clip:
                dispatch_clip_grad(model.parameters(), clip)
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def _peak_mib(device, peaks: dict, name: str, fn, *args) -> float:
    """Run ``fn(*args)``; on CUDA record the loop's peak allocated memory (MiB) under ``name``."""
    if device.type != "cuda":
        return fn(*args)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = fn(*args)
    peaks[name] = max(peaks.get(name, 0.0), round(torch.cuda.max_memory_allocated(device) / 2**20, 1))
    return seconds


def _trainer_loop(t, batches) -> float:
    """The real trainer loop body over in-memory batches. Seconds per step."""
    from distrib.training.trainer import train_epoch

    t.epoch_batches = lambda: iter(batches)  # instance attribute shadows the shard-reading method
    t.micro_per_epoch = t.steps_per_epoch = len(batches)
    t.pos = 0
    t0 = time.perf_counter()
    train_epoch(t)
    if t.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def _build_trainer(cfg, model, out: Path, steps: int):
    from distrib.training import dist
    from distrib.training.losses import build_loss
    from distrib.training.optim import build_optimizer, build_scheduler
    from distrib.training.runlog import RunLogger
    from distrib.training.state import Trainer

    acc = dist.build_accelerator(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = acc.prepare(model, optimizer)
    sched = build_scheduler(optimizer, cfg.optim, steps, steps * (2 * ROUNDS + 2))
    t = Trainer(
        cfg,
        out,
        acc,
        model,
        optimizer,
        sched,
        build_loss(cfg.train, cfg.model),
        None,
        RunLogger(out, enabled=acc.is_main_process),
        [],
        steps,
        steps,
    )
    t.loss_sum = t.loss_sum.to(acc.device)
    return t


def run(
    config: str | None = None,
    out: str | None = None,
    steps: int = 20,
    num_processes: int = 1,
    overrides=(),
    vs: str = "bare",
) -> dict:
    from accelerate.utils import set_seed

    from distrib.errors import DistribError
    from distrib.models import build_model
    from distrib.training import dist

    if num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise DistribError(
            f"--num-processes {num_processes}: launch the bench under accelerate instead: "
            f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes "
            f"{num_processes} .venv/bin/distrib bench trainer"
        )
    config = config or str(Path(__file__).resolve().parents[3] / "launch" / "configs" / "experiments" / "debug.yaml")
    cfg = load_config(config, list(overrides or []))
    steps = max(2, int(steps))
    batches = _batches(cfg, steps)
    set_seed(cfg.train.seed)
    trainer_model = build_model(cfg.model)
    set_seed(cfg.train.seed)
    bare_model = build_model(cfg.model)
    if vs not in ("bare", "timm"):
        raise DistribError(f"bench trainer --vs {vs!r}; use --vs bare (a plain torch loop) or --vs timm")
    set_seed(cfg.train.seed)
    timm_model = build_model(cfg.model) if vs == "timm" else None
    out = Path(out or tempfile.mkdtemp(prefix="bench_trainer_"))
    t = _build_trainer(cfg, trainer_model, out, steps)
    try:
        device = t.accelerator.device
        bare_model.to(device)
        if t.accelerator.num_processes > 1:  # same process count: the bare loop gets plain torch DDP
            bare_model = torch.nn.parallel.DistributedDataParallel(bare_model)
        _bare_loop(bare_model, batches[:2], cfg, device)  # warm-up: allocator, kernels, thread pools
        _trainer_loop(t, batches[:2])
        if timm_model is not None:
            timm_model.to(device)
            if t.accelerator.num_processes > 1:
                timm_model = torch.nn.parallel.DistributedDataParallel(timm_model)
            _timm_loop(timm_model, batches[:2], cfg, device)
        bare, trainer, timm_s, peaks = [], [], [], {}
        for i in range(ROUNDS):  # alternate which loop goes first, so drift on a shared machine cancels
            if i % 2:
                trainer.append(_peak_mib(device, peaks, "trainer_peak_gpu_mib", _trainer_loop, t, batches))
            bare.append(_peak_mib(device, peaks, "bare_peak_gpu_mib", _bare_loop, bare_model, batches, cfg, device))
            if timm_model is not None:
                timm_s.append(
                    _peak_mib(device, peaks, "timm_peak_gpu_mib", _timm_loop, timm_model, batches, cfg, device)
                )
            if not i % 2:
                trainer.append(_peak_mib(device, peaks, "trainer_peak_gpu_mib", _trainer_loop, t, batches))
        info = dist.runtime_info(t.accelerator)
        t.log.close()
    finally:
        dist.finish(t.accelerator)
    bare_s, trainer_s = statistics.median(bare), statistics.median(trainer)
    imgs = cfg.data.batch_size * info["world_size"]
    vs_timm = {}
    if timm_s:
        ts = statistics.median(timm_s)
        vs_timm = {
            "vs": "timm",
            "precision": cfg.train.mixed_precision,
            "timm_ms_per_step": round(ts * 1000, 2),
            "timm_images_per_s": round(imgs / ts, 1),
            "ratio_to_timm": round(ts / trainer_s, 4),
        }
    ratio = round(bare_s / trainer_s, 4)  # target_met judges the printed figure
    return {
        "bench": "trainer",
        "model": cfg.model.name,
        "img_size": cfg.data.img_size,
        "batch_size": cfg.data.batch_size,
        "steps": steps,
        "rounds": ROUNDS,
        **info,
        "bare_ms_per_step": round(bare_s * 1000, 2),
        "trainer_ms_per_step": round(trainer_s * 1000, 2),
        "bare_images_per_s": round(imgs / bare_s, 1),
        "trainer_images_per_s": round(imgs / trainer_s, 1),
        "ratio_to_bare_loop": ratio,
        "target": TARGET,
        "target_met": ratio >= TARGET,
        **vs_timm,
        **peaks,
    }
