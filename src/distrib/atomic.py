"""Atomic file writes: every artifact is written to a temp name beside it and renamed into place.

A reader (or a resumed run after SIGKILL, or a full disk) therefore sees either the old file or the
complete new one, never a partial file. ``atomic_path`` keeps the suffix, so writers that infer a
format from it (matplotlib, numpy's savez) still work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from distrib.errors import DistribError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the block failed (e.g. disk full): leave no half-written temp behind
            tmp.unlink()


def writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` (parents too) and prove a file can be written in it; else a one-line DistribError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DistribError(
            f"cannot write to {what} {path}: {e.strerror or e} ({e.filename or path}); "
            "choose a directory you can write to, or fix its permissions"
        ) from None
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Atomically save a matplotlib figure (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def json_safe(obj):
    """Strict-JSON copy: NaN/inf -> None plus ``<key>_reason`` beside it (an undefined metric, e.g. AUC on
    one class; a reader sees why it is missing), numpy -> Python, anything else unknown -> str."""
    import numpy as np

    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[str(k)] = json_safe(v)
            if isinstance(v, (float, np.floating)) and not np.isfinite(v):
                out[f"{k}_reason"] = f"undefined ({float(v)}): e.g. an AUC on a split with one class"
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if obj is None or isinstance(obj, (str, int)):
        return obj
    return str(obj)


def write_json(path: str | Path, obj, indent: int = 2) -> Path:
    """Atomically write ``obj`` as strict JSON (see ``json_safe``)."""
    import json

    return write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False))
