"""Atomic training checkpoints (model, optimizer, scaler, RNG, loop position) and best_model.pth.

Everything we write loads with ``torch.load(weights_only=True)``: RNG states are stored as tensors
and plain lists, never pickled numpy objects. A checkpoint is written into ``NAME.tmp/`` by all
ranks, then rank 0 swaps it in with renames, so a crash (or SIGKILL) at any moment leaves either
the previous complete checkpoint or the new one, never a half-written one. Under DeepSpeed the
engine writes its own (partitioned) model/optimizer files into the same directory.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib.atomic import atomic_path
from distrib.errors import DistribError
from distrib.runs import load_torch
from distrib.training import dist

_DS_TAG = "deepspeed"


def _save(obj: Any, path: Path, shown: Path | None = None) -> None:
    """torch.save; a full disk becomes an ENOSPC OSError naming the file and the bytes written so far.

    torch's zip writer reports a failed write as ``RuntimeError: ... unexpected pos`` / ``file write
    failed``, which would otherwise reach the user as a traceback.
    """
    try:
        torch.save(obj, path)
    except (RuntimeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in ("unexpected pos", "file write failed")):
            raise
        written = path.stat().st_size if path.is_file() else 0
        raise OSError(errno.ENOSPC, f"{written} bytes written before the disk filled", str(shown or path)) from None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path.tmp`` then rename: readers never see a partial file."""
    with atomic_path(path) as tmp:
        _save(obj, tmp, Path(path))
    return Path(path)


def rng_state() -> dict:
    """This process's python / numpy / torch (CPU and CUDA) RNG states, weights_only-loadable."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    ver, internal, gauss = random.getstate()
    return {
        "python": [ver, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    ver, internal, gauss = state["python"]
    random.setstate((ver, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _publish(tmp: Path, final: Path) -> None:
    """Swap a finished ``tmp`` directory in for ``final`` (rank 0 only; two renames)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(accelerator, ckpt_dir: str | Path, model, optimizer, trainer_state: dict, rng: dict) -> Path:
    """Collective: every rank must call it. ``rng`` is this rank's {name: rng_state()} dict."""
    final = Path(ckpt_dir)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():  # left behind by a crash mid-write
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if dist.is_deepspeed(accelerator):
        model.save_checkpoint(str(tmp), tag=_DS_TAG)  # collective; writes this rank's partitions
    elif accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
        _save(
            {
                "model": dist.unwrap(accelerator, model, keep_torch_compile=False).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler,
            },
            tmp / "state.pt",
        )
    _save(rng, tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        _save(trainer_state, tmp / "trainer_state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _publish(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt_dir: str | Path, model, optimizer) -> tuple[dict, dict]:
    """Restore model/optimizer/scaler in place; return (trainer_state, this rank's RNG dict)."""
    ckpt_dir = Path(ckpt_dir)
    rng_path = ckpt_dir / f"rng_{accelerator.process_index}.pt"
    if not rng_path.is_file():
        raise DistribError(
            f"checkpoint {ckpt_dir} has no {rng_path.name}: it was written with a different "
            f"number of processes; resume with the same --num_processes, or start a new run dir"
        )
    fix = _corrupt_fix(ckpt_dir)
    trainer_state = load_torch(ckpt_dir / "trainer_state.pt", fix)
    if dist.is_deepspeed(accelerator):
        if not (ckpt_dir / _DS_TAG).is_dir():
            raise DistribError(
                f"checkpoint {ckpt_dir} was not written by DeepSpeed; resume it with the "
                "accelerate config it was trained with"
            )
        model.load_checkpoint(str(ckpt_dir), tag=_DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        if not (ckpt_dir / "state.pt").is_file():
            raise DistribError(
                f"checkpoint {ckpt_dir} has no state.pt (a DeepSpeed checkpoint?); resume it "
                "with the accelerate config it was trained with"
            )
        state = load_torch(ckpt_dir / "state.pt", fix)
        dist.unwrap(accelerator, model, keep_torch_compile=False).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state["scaler"]:
            accelerator.scaler.load_state_dict(state["scaler"])
    rng = load_torch(rng_path, fix)
    return trainer_state, rng


def _corrupt_fix(ckpt_dir: Path) -> str:
    return (
        f"delete {ckpt_dir} (and {ckpt_dir.name}.old if it is there) and train again without --resume "
        "into a new --out, or restore the run folder from a backup"
    )


def saved_state(ckpt_dir: str | Path) -> dict:
    """The checkpoint's trainer_state (loop position, and since the resume guard, the config it trained)."""
    return load_torch(Path(ckpt_dir) / "trainer_state.pt", _corrupt_fix(Path(ckpt_dir)))


def remove_stale_tmp(run_dir: str | Path, names: tuple[str, ...] = ("last_checkpoint",)) -> list[str]:
    """Delete ``NAME.tmp/`` dirs a killed writer left behind; returns what was removed.

    Safe whenever no process is writing into ``run_dir``: a ``.tmp`` is only ever published by
    renaming it, and ``runs.find_checkpoint`` never reads one, so it holds nothing a resume could use.
    """
    removed = []
    for name in names:
        tmp = Path(run_dir) / f"{name}.tmp"
        if tmp.is_dir():
            shutil.rmtree(tmp)
            removed.append(str(tmp))
    return removed


def save_best(path: str | Path, state_dict: dict, config: dict, metrics: dict) -> Path:
    """best_model.pth = {state_dict, config, metrics}: tensors and plain Python types only."""
    # torch.compile wraps the module as `_orig_mod`; saved weights must load into a plain model
    clean = {k.replace("_orig_mod.", ""): v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return atomic_torch_save({"state_dict": clean, "config": config, "metrics": plain(metrics)}, path)


def plain(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples into JSON- and weights_only-safe Python types."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj
