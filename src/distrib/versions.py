"""Provenance written into each run directory: package versions (versions.json) and the fold protocol
(fold_protocol.json: which shards, folds, seed and group->fold table the run trained and validated on)."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "distrib",
    "torch",
    "torchvision",
    "timm",
    "accelerate",
    "deepspeed",
    "transformers",
    "webdataset",
    "ray",
    "lightgbm",
    "tensorboard",
    "scikit-learn",
    "kornia",
    "simplejpeg",
    "numpy",
    "pillow",
)


def collect_versions() -> dict:
    """Installed versions of the stack (None when a package is absent), plus python/platform/CUDA."""
    out: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return out


def write_versions(out_dir: str | Path) -> Path:
    from distrib.atomic import write_json

    return write_json(Path(out_dir) / "versions.json", collect_versions())


def fold_protocol(index: dict, shards: str, val_fold: int, train_folds: list[int]) -> dict:
    """The split a run used, from the shard index: enough to check that two runs used the same folds."""
    groups = index.get("groups", {})
    table = json.dumps(sorted(groups.items()), separators=(",", ":")).encode()
    return {
        "shards": str(shards),
        "folds": index.get("folds"),
        "seed": index.get("seed"),
        "index_fingerprint": index.get("fingerprint"),
        "method": "sklearn StratifiedGroupKFold",
        "val_fold": val_fold,
        "validation": f"fold {val_fold}" if val_fold >= 0 else "val split",
        "train_folds": list(train_folds),
        "n_groups": len(groups),
        "group_fold_sha256": hashlib.sha256(table).hexdigest(),
        "fold_label_counts": index.get("fold_label_counts"),
        "split_counts": index.get("split_counts"),
    }


def write_fold_protocol(out_dir: str | Path, protocol: dict) -> Path:
    from distrib.atomic import write_json

    return write_json(Path(out_dir) / "fold_protocol.json", protocol)
