"""``distrib export``: a run's best model + its preprocessing -> ONNX (or TorchScript), checked and timed.

    distrib export runs/demo/stage1 --format onnx --int8 --threads 1

The exported graph takes what ``ImageTransform.prepare`` produces, uint8 ``[B, 3, S, S]`` (shorter side
resized to S bilinear, centre crop), and returns P(positive) ``[B]``: ``Deployable`` runs the run's own
eval ``ImageTransform.batch`` (mean/std, ``highpass``) and the classification path
``forward_head(forward_features(x))`` inside the graph (GenConViT: encoder-decoder reconstruction +
both backbones + head; the reconstruction outputs are dropped). The constants are also written to
``<out>.json`` next to the model.

Checks, on real validation images from the run's shards (``export.validate_samples``): the maximum
absolute probability difference against PyTorch and the AUC of both (sklearn). Costs: ONNX Runtime CPU
latency at batch 1 (median and p95 of ``export.latency_repeats`` runs, ``--threads``) and file size,
against ``export.max_latency_ms`` / ``export.max_size_mb`` (the pit plan's 16 ms / 100 MB). ``--int8``
adds an ONNX Runtime static QDQ quantization (uint8 activations, int8 per-channel weights, MinMax
calibration on the validation images) and reports its AUC change and speed, which can be worse.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from distrib.atomic import atomic_path, write_json
from distrib.errors import DataError, DistribError
from distrib.extras import require

log = logging.getLogger(__name__)


def _deployable(model, transform):
    import torch

    from distrib.training.losses import positive_prob

    class Deployable(torch.nn.Module):
        """uint8 [B, 3, S, S] -> P(positive) [B]: the run's eval normalization, then the classification path."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return positive_prob(self.model.forward_head(self.model.forward_features(transform.batch(x))))

    return Deployable().eval()


def _val_images(cfg, limit: int):
    """Up to ``limit`` real validation images (uint8 [N, 3, S, S]) and labels from the run's shards."""
    import torch

    from distrib.cascade.run import MultiSizeTransform
    from distrib.inference.images import open_images

    try:
        source = open_images(cfg.data.shards, "val")
    except Exception as e:
        raise DataError(
            f"export validates on the run's val split, but {cfg.data.shards or '(data.shards empty)'} "
            f"cannot provide it ({e}); pass data.shards=SHARD_DIR with a val split"
        ) from e
    multi = MultiSizeTransform([cfg.data.img_size])
    xs, ys = [], []
    for b in source.batches(multi, 64, 0):
        xs.append(b["image"].reshape(-1, 3, cfg.data.img_size, cfg.data.img_size))
        ys.append(b["label"])
        if sum(len(y) for y in ys) >= limit:
            break
    return torch.cat(xs)[:limit].contiguous(), np.concatenate(ys)[:limit].astype(int)


def _auc(y, p) -> float:
    from distrib.metrics import binary_metrics

    return binary_metrics(y, p)["auc"]


def _timings(fn, x, repeats: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t0) * 1000.0)
    return {"median": float(np.median(ts)), "p95": float(np.percentile(ts, 95)), "repeats": repeats}


def _size_mb(path: Path) -> float:
    extra = Path(str(path) + ".data")
    return (path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)) / 2**20


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _export_onnx(wrapper, example, path: Path, ecfg) -> None:
    import torch

    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        if ecfg.exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                dynamo=True,
                external_data=False,
                opset_version=ecfg.opset,
                input_names=["image"],
                output_names=["prob"],
                dynamic_shapes={"x": {0: batch}},
            )
        else:
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=ecfg.opset,
                input_names=["image"],
                output_names=["prob"],
                dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}},
            )


def _quantize(src: Path, dst: Path, images) -> None:
    """Static QDQ int8: uint8 activations, int8 per-channel weights, MinMax over the validation images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"image": images[i : i + 1].numpy()} for i in range(min(len(images), 64))])

        def get_next(self):
            return next(self.rows, None)

    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as e:  # optional optimisation step; quantize the plain graph instead
        log.info(f"export: int8 pre-processing skipped ({type(e).__name__}: {e})")
        pre = src
    with atomic_path(dst) as tmp:
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    if pre != src:
        pre.unlink(missing_ok=True)


def _check(name: str, path: Path, predict, images, y, ref, torch_auc: float, threads: int, ecfg) -> dict:
    probs = np.concatenate([predict(images[i : i + 64]) for i in range(0, len(images), 64)])
    auc = _auc(y, probs)
    res = {
        "path": str(path),
        "size_mb": round(_size_mb(path), 3),
        "threads": threads,
        "max_abs_prob_diff": float(np.max(np.abs(probs - ref))),
        "auc": auc,
        "auc_delta_vs_torch": auc - torch_auc,
        "latency_ms": _timings(predict, images[:1], ecfg.latency_repeats),
    }
    res["meets_latency"] = res["latency_ms"]["median"] <= ecfg.max_latency_ms
    res["meets_size"] = res["size_mb"] <= ecfg.max_size_mb
    # int8 is judged by its AUC change, not by matching fp32 probabilities
    res["matches_torch"] = None if name == "int8" else bool(res["max_abs_prob_diff"] <= ecfg.max_prob_diff)
    res["passed"] = bool(res["meets_latency"] and res["meets_size"] and res["matches_torch"] is not False)
    return res


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    int8: bool = False,
    out: str | Path | None = None,
    threads: int = 1,
    overrides=(),
) -> dict:
    """Export, validate and time ``run_dir``'s best model; returns the figures (see module docstring)."""
    import torch

    from distrib.config import load_config
    from distrib.data.transforms import build_transform, resolve_mean_std
    from distrib.runs import load_run

    run_dir = Path(run_dir)
    if fmt not in ("onnx", "torchscript"):
        raise DistribError(f"export --format {fmt!r}: use onnx or torchscript")
    if int8 and fmt != "onnx":
        raise DistribError("export --int8 quantizes with ONNX Runtime: use it with --format onnx")
    if threads < 1:
        raise DistribError(f"export --threads {threads}: must be >= 1")
    if fmt == "onnx":  # torch.onnx's dynamo exporter writes through onnxscript; the checks run on ONNX Runtime
        require("onnx", "onnxscript", "onnxruntime", extra="export", feature="distrib export --format onnx")
    if not (run_dir / "best_model.pth").is_file():
        raise DataError(
            f"{run_dir / 'best_model.pth'} not found: export needs a finished run directory "
            "(distrib train CONFIG --out RUN_DIR)"
        )
    model, cfg, _ = load_run(run_dir)
    if (run_dir / "config.yaml").is_file() or overrides:  # export.* targets (and data.shards) may be overridden
        cfg = load_config(run_dir / "config.yaml", list(overrides)) if (run_dir / "config.yaml").is_file() else cfg
    ecfg = cfg.export
    mean_std = resolve_mean_std(cfg.data, model)
    transform = build_transform(None, cfg.data, train=False, mean_std=mean_std)
    wrapper = _deployable(model, transform)
    images, y = _val_images(cfg, ecfg.validate_samples)
    path = Path(out) if out else run_dir / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    path.parent.mkdir(parents=True, exist_ok=True)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ref = np.concatenate([wrapper(images[i : i + 64]).numpy() for i in range(0, len(images), 64)])
            torch_auc = _auc(y, ref)
            torch_lat = _timings(wrapper, images[:1], ecfg.latency_repeats)
        t0 = time.perf_counter()
        example = images[:2].clone()
        if fmt == "onnx":
            _export_onnx(wrapper, example, path, ecfg)
        else:
            with warnings.catch_warnings(), torch.no_grad(), atomic_path(path) as tmp:
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(wrapper, example), str(tmp))
        export_s = time.perf_counter() - t0
        artifacts = {}
        if fmt == "onnx":
            sess = _ort_session(path, threads)
            artifacts["fp32"] = _check(
                "fp32",
                path,
                lambda x: sess.run(None, {"image": x.numpy()})[0],
                images,
                y,
                ref,
                torch_auc,
                threads,
                ecfg,
            )
            if int8:
                qpath = path.with_name(path.stem + ".int8.onnx")
                _quantize(path, qpath, images)
                qsess = _ort_session(qpath, threads)
                artifacts["int8"] = _check(
                    "int8",
                    qpath,
                    lambda x: qsess.run(None, {"image": x.numpy()})[0],
                    images,
                    y,
                    ref,
                    torch_auc,
                    threads,
                    ecfg,
                )
                artifacts["int8"]["speedup_vs_fp32"] = (
                    artifacts["fp32"]["latency_ms"]["median"] / artifacts["int8"]["latency_ms"]["median"]
                )
        else:
            ts = torch.jit.load(str(path))
            with torch.inference_mode():
                artifacts["fp32"] = _check(
                    "fp32", path, lambda x: ts(x).numpy(), images, y, ref, torch_auc, threads, ecfg
                )
    finally:
        torch.set_num_threads(old_threads)
    prep = {
        "input": f"uint8 [B, 3, {cfg.data.img_size}, {cfg.data.img_size}] RGB, NCHW",
        "resize": f"shorter side to {cfg.data.img_size} (bilinear), centre crop",
        "size": cfg.data.img_size,
        "normalize": cfg.data.normalize,
        "mean": list(mean_std[0]) if mean_std else None,
        "std": list(mean_std[1]) if mean_std else None,
        "scale": "0-255 (mean/std above are x255 in the graph)",
        "highpass": cfg.data.highpass,
        "in_graph": True,
        "output": "prob [B] = P(positive class)",
    }
    sidecar = path.with_name(path.name + ".json")
    write_json(sidecar, {"run": str(run_dir), "model": cfg.model.name, "format": fmt, "preprocessing": prep})
    result = {
        "run": str(run_dir),
        "model": cfg.model.name,
        "format": fmt,
        "exporter": ecfg.exporter if fmt == "onnx" else "torch.jit.trace",
        "export_s": round(export_s, 2),
        "sidecar": str(sidecar),
        "preprocessing": prep,
        "validation": {"split": "val", "n": int(len(y))},
        "targets": {
            "max_latency_ms": ecfg.max_latency_ms,
            "max_size_mb": ecfg.max_size_mb,
            "max_prob_diff": ecfg.max_prob_diff,
        },
        "torch": {"auc": torch_auc, "latency_ms": torch_lat, "threads": threads},
        "artifacts": artifacts,
        "cpu_count": os.cpu_count(),
    }
    result["passed"] = any(a["passed"] for a in artifacts.values())
    return result


__all__ = ["export_run"]
