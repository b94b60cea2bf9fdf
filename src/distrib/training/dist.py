"""The one module that owns rank questions: builds the Accelerator, prints on rank 0, ends cleanly.

DDP vs DeepSpeed is decided by the accelerate config file the job was launched with (it sets the
ACCELERATE_* environment); nothing here or in the training loop branches on it beyond filling in
DeepSpeed's batch-size / accumulation / clipping fields from the experiment config.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from distrib.config import ConfigError, ExperimentConfig

_ACCELERATOR = None  # the live Accelerator, so print0/is_main work without passing it around
_RANK = 0  # this process's global rank; kept after finish() so entry points can still print0
_OWNS_GROUP = True  # False when a host (e.g. Ray Train) created the process group before us


def _use_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def using_deepspeed() -> bool:
    """True when launched with an accelerate DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def _launched_distributed() -> bool:
    """True under a multi-process launcher (accelerate launch / torchrun / DeepSpeed set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or using_deepspeed()


def resolve_backend(cfg: ExperimentConfig) -> str:
    """'auto' -> nccl on GPU, gloo on CPU; an explicit nccl without a GPU is a config error."""
    backend = cfg.dist.backend
    if backend == "auto":
        return "gloo" if _use_cpu() else "nccl"
    if backend == "nccl" and _use_cpu():
        raise ConfigError(
            "dist.backend=nccl needs CUDA GPUs, but this process runs on CPU; "
            "use dist.backend=auto or dist.backend=gloo"
        )
    return backend


def check_precision(cfg: ExperimentConfig, model: torch.nn.Module) -> None:
    """Fail before the process group starts on precision settings this device cannot run."""
    mp = cfg.train.mixed_precision
    if mp == "no" or not _use_cpu():
        return
    if mp == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU (CPU autocast has no fp16 grad "
            "scaler); use train.mixed_precision=bf16 or no on CPU"
        )
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if mp == "bf16" and has_bn:
        raise ConfigError(
            f"train.mixed_precision=bf16 with BatchNorm layers (model.name={cfg.model.name!r}) "
            "fails on CPU (BatchNorm backward has no bf16 CPU kernel); use "
            "train.mixed_precision=no on CPU, or run on a GPU"
        )


def build_accelerator(cfg: ExperimentConfig):
    """Create the Accelerator (starts the process group) with the experiment's precision and accumulation.

    Under DeepSpeed the micro-batch size, accumulation and clipping come from ``cfg`` so a single
    accelerate config file serves every experiment (without train_micro_batch_size_per_gpu
    DeepSpeed asserts, and on CPU it needs gloo explicitly).
    """
    global _ACCELERATOR, _RANK, _OWNS_GROUP
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    backend = resolve_backend(cfg)
    if using_deepspeed() and _use_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _OWNS_GROUP = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    handlers = []
    if _launched_distributed():  # a backend on a single process would make accelerate expect a process group
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.dist.timeout_s)))
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=_use_cpu() and not using_deepspeed(),  # cpu=True would switch DeepSpeed off
        # our loader is already split per rank and not prepared, so accumulation counts micro-batches
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False
        ),
        kwargs_handlers=handlers,
        log_with=[t for t in cfg.train.trackers if t != "tensorboard"] or None,  # TB: RunLogger's own writer
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = cfg.optim.grad_clip
        if cfg.train.mixed_precision in ("bf16", "fp16"):
            ds.setdefault(cfg.train.mixed_precision, {})["enabled"] = True
    _ACCELERATOR, _RANK = accelerator, accelerator.process_index
    return accelerator


def runtime_info(accelerator) -> dict[str, Any]:
    """What really ran: world size, device type, distributed type and process-group backend."""
    backend = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = str(torch.distributed.get_backend())
    return {
        "world_size": accelerator.num_processes,
        "device_type": accelerator.device.type,
        "distributed_type": str(
            accelerator.distributed_type.value
            if hasattr(accelerator.distributed_type, "value")
            else accelerator.distributed_type
        ),
        "backend": backend or "none",
        "mixed_precision": accelerator.mixed_precision if not is_deepspeed(accelerator) else _ds_precision(accelerator),
    }


def _ds_precision(accelerator) -> str:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for name in ("bf16", "fp16"):
        if isinstance(ds.get(name), dict) and ds[name].get("enabled") is True:
            return name
    return "no"


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def unwrap(accelerator, model, keep_torch_compile: bool = True) -> torch.nn.Module:
    """``accelerator.unwrap_model``, except for a model nothing wraps (one process, no DeepSpeed, not
    compiled): that is returned as is, because accelerate's unwrap imports deepspeed whenever it is
    installed, seconds paid by the first trial of every Ray worker (docs/performance-notes.md)."""
    wrapped = (
        accelerator.num_processes > 1
        or is_deepspeed(accelerator)
        or hasattr(model, "_orig_mod")
        or hasattr(model, "module")
    )
    return accelerator.unwrap_model(model, keep_torch_compile=keep_torch_compile) if wrapped else model


def state_dict(accelerator, model) -> dict:
    """The full model's state dict with plain keys: ``accelerator.get_state_dict`` under DeepSpeed/FSDP
    (a collective there), else the unwrapped model's, also out of ``torch.compile`` (accelerate's own
    keeps the compiled wrapper, whose keys carry an ``_orig_mod.`` prefix) and without the deepspeed
    import when nothing wraps the model (``unwrap``)."""
    if is_deepspeed(accelerator) or "FSDP" in str(accelerator.distributed_type):
        return accelerator.get_state_dict(model)
    return unwrap(accelerator, model, keep_torch_compile=False).state_dict()


def sync_buffers(accelerator, model) -> None:
    """Broadcast module buffers (BatchNorm running stats) from rank 0 under DeepSpeed.

    DDP broadcasts buffers from rank 0 at every forward; DeepSpeed does not, so each rank's running
    statistics drift with its own batches and rank 1 would evaluate different weights from the ones
    rank 0 saves in best_model.pth. Called before each evaluation, it restores DDP's semantics.
    """
    if accelerator.num_processes == 1 or not is_deepspeed(accelerator):
        return
    for buf in unwrap(accelerator, model).buffers():
        torch.distributed.broadcast(buf.data, src=0)


def is_main() -> bool:
    """True on the global rank-0 process (also before and after training)."""
    return _RANK == 0


def rank() -> int:
    return _RANK


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so launcher logs interleave sensibly."""
    if is_main():
        print(*args, flush=True, **kwargs)


def on_main(fn, *args, **kwargs):
    """Call ``fn`` on rank 0 only (file outputs), so the training loop never asks which rank it is on."""
    return fn(*args, **kwargs) if is_main() else None


def print_all(*args, **kwargs) -> None:
    """print() on every rank, prefixed with the rank (for per-rank facts such as weight checksums)."""
    print(f"[rank {rank()}]", *args, flush=True, **kwargs)


def barrier() -> None:
    if _ACCELERATOR is not None:
        _ACCELERATOR.wait_for_everyone()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (identity when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def finish(accelerator, ok: bool = True) -> None:
    """End training: a barrier first; without it gloo's process-group destructor intermittently hangs at exit.

    After an error (``ok=False``) there is no barrier: the other ranks may be stuck in a collective
    and would hold this one until the timeout; tearing the group down lets the launcher fail fast.
    """
    global _ACCELERATOR
    if ok:
        accelerator.wait_for_everyone()
    if _OWNS_GROUP:  # a group created by a host (Ray Train workers) is the host's to destroy
        accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _ACCELERATOR = None
    # a following run in the same process (tests, Tune trials) must build a fresh state; accelerate has no
    # public reset (docs/DESIGN.md, library internals; tests/test_internals.py)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
