"""Reading finished runs: ``best_model.pth``, the last checkpoint's weights, and weight checksums.

The trainer (distillation teachers), embedding, the cascade and prediction all read runs through
this module; none of them imports the training loop. Every file loads with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from distrib.config import ExperimentConfig, build_config
from distrib.errors import DistribError

LAST = "last_checkpoint"  # the run dir's resumable checkpoint folder


def load_torch(path: str | Path, fix: str) -> dict:
    """``torch.load(weights_only=True)`` of a file this project wrote; anything else is a one-line DistribError.

    A truncated file (EOF, a zip without its central directory), a crafted pickle that weights_only refuses,
    or any other unreadable payload all name the file and ``fix`` (what to do); no code in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise DistribError(f"{path} not found; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DistribError(
            f"{path}: not a checkpoint this version wrote ({type(e).__name__}: {reason}); {fix}"
        ) from None


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (a crash between the two renames leaves ``.old``)."""
    run_dir = Path(run_dir)
    for name in (LAST, LAST + ".old"):
        p = run_dir / name
        if (p / "trainer_state.pt").is_file():
            return p
    return None


def load_best(path: str | Path) -> dict:
    """The ``best_model.pth`` payload {state_dict, config, metrics}, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise DistribError(f"model file not found: {path}; train a run first (distrib train CONFIG --out RUN_DIR)")
    return load_torch(path, "re-train the run (distrib train CONFIG --out RUN_DIR) or restore the file from a backup")


def param_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: equal on all DDP / ZeRO-2 ranks when they stayed in sync.

    Under ZeRO-3 a rank holds only parameter partitions, so compare best_model.pth (gathered) instead.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()[:16]


def model_from_payload(payload: dict):
    from distrib.models import build_model

    cfg = build_config(payload["config"])
    # the weights come from the payload, so never re-read a pretrained file that may not exist here
    model_cfg = dataclasses.replace(cfg.model, pretrained_file="", pretrained=False)
    model = build_model(model_cfg)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), cfg, payload["metrics"]


def load_run(run_dir: str | Path, which: str = "best") -> tuple[torch.nn.Module, ExperimentConfig, dict]:
    """(model in eval mode, resolved config, metrics) of a finished run: ``which`` is 'best' or 'last'."""
    run_dir = Path(run_dir)
    if which == "best":
        return model_from_payload(load_best(run_dir / "best_model.pth"))
    if which == "last":
        ckpt = find_checkpoint(run_dir)
        if ckpt is None or not (ckpt / "state.pt").is_file():
            raise DistribError(f"{run_dir} has no DDP/single-process last checkpoint; use which='best'")
        best = load_best(run_dir / "best_model.pth")
        state = load_torch(ckpt / "state.pt", f"delete {ckpt} to fall back to best_model.pth (which='best')")
        return model_from_payload({**best, "state_dict": state["model"]})
    raise DistribError(f"load_run(which={which!r}): use 'best' or 'last'")
