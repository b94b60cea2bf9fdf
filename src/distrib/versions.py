"""Package and platform versions written into each run directory (versions.json), for replaying a run."""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("distrib", "torch", "torchvision", "timm", "accelerate", "deepspeed", "transformers", "webdataset",
            "ray", "lightgbm", "tensorboard", "scikit-learn", "kornia", "simplejpeg", "numpy", "pillow")


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
    path = Path(out_dir) / "versions.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(collect_versions(), indent=2))
    os.replace(tmp, path)
    return path
