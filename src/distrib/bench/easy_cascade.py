"""A dataset where stage 1 is strong, and the smallest real cascade on it, for ``distrib bench cascade build=easy``.

The task is synthetic and separable: every image is smooth random colour noise (32x32, PNG); a positive
also carries a bright 20x20 square at a random place. A small CNN separates that within a few dozen
steps, so stage 1 auto-decides nearly every image at recall 0.99 / specificity 0.95 and the cascade's
cost should approach stage 1's. The pipeline is the real one, on debug-sized settings: shards
(3 group folds), stage 1 (one debug run), one expert = 3 fold runs + ``embed.inference: refit`` (one
model on all folds, aligned), the stack, and a cascade YAML (``evaluate_all_stages``, so the K fold
models are also timed and scored on every image).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from distrib.errors import DistribError

log = logging.getLogger(__name__)
DATASET = "synthetic separable task: smooth colour noise, positives carry a bright 20x20 square (32x32 PNG)"
DEBUG = Path(__file__).resolve().parents[3] / "launch" / "configs" / "experiments" / "debug.yaml"
RUN = [
    "train.epochs=2",
    "data.samples_per_epoch=256",
    "train.latency_batches=1",
    "embed.dim=8",
    "embed.anchors=32",
    "embed.fit_samples=128",
    "embed.inference=refit",
    "stack.folds=3",
    "stack.n_estimators=50",
    "thresholds.bootstrap=20",
]


def _image(rng: np.random.Generator, positive: bool, square: int = 20) -> np.ndarray:
    base = rng.integers(40, 180, size=(4, 4, 3)).astype(np.float32)
    img = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 12, size=(32, 32, 3))
    if positive:
        y, x = rng.integers(0, 32 - square, size=2)
        img[y : y + square, x : x + square] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def build_dataset(out: Path, n: int = 480, seed: int = 0, square: int = 20) -> dict[str, Path]:
    """Write PNGs + train/val/test manifests (path,label,group; 60/20/20, one group per 4 images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "val": [], "test": []}
    for i in range(n):
        label = int(i % 2)
        path = img_dir / f"img{i:05d}.png"
        if not path.is_file():
            Image.fromarray(_image(rng, bool(label), square)).save(path)
        g = i // 4
        split = "train" if g % 5 < 3 else ("val" if g % 5 == 3 else "test")
        rows[split].append([str(path), label, f"g{g}"])
    paths = {}
    for split, r in rows.items():
        paths[split] = out / f"{split}_manifest.csv"
        with open(paths[split], "w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "group"], *r])
    return paths


def build_cascade(out: str | Path, square: int = 20) -> Path:
    """Dataset, shards, stage 1, one refit expert and its stack under ``out``; returns the cascade YAML.

    ``square``: the positives' square side (smaller = harder for stage 1). Finished parts are reused (the runs, the refit run, the shards), so a second call only re-runs the cascade.
    """
    import yaml

    from distrib.config import load_config
    from distrib.data.shards import write_shards
    from distrib.stacking.embed import extract_oof
    from distrib.stacking.stack import fit_stack
    from distrib.training.trainer import run

    out = Path(out).resolve()
    if not 4 <= square <= 28:
        raise DistribError(f"bench cascade square={square}: use 4..28 (pixels of a 32 px image)")
    man = build_dataset(out / "data", square=square)
    shards = out / "shards"
    write_shards(man["train"], shards, val=man["val"], test=man["test"], folds=3, seed=0, shard_size=200, workers=1)
    runs = []
    for name, fold in (("stage1", -1), ("fold0", 0), ("fold1", 1), ("fold2", 2)):
        d = out / name
        if not (d / "evaluation_results.json").is_file():
            run(load_config(DEBUG, [f"data.shards={shards}", f"data.fold={fold}", *RUN]), d)
        runs.append(str(d))
    cfg = load_config(DEBUG, RUN)
    oof = out / "expert" / "oof_embeddings.parquet"
    oof.parent.mkdir(exist_ok=True)
    if not oof.is_file():
        extract_oof(runs[1:], oof, cfg.embed)
    if not (out / "stack" / "stack_results.json").is_file():
        fit_stack([oof], out / "stack", cfg.stack)
    path = out / "cascade.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "easy cascade (bench)",
                "batch_size": 64,
                "device": "auto",
                "recall": 0.99,
                "specificity": 0.95,
                "bootstrap": 20,
                "stage1": {"run": runs[0]},
                "stack": {"dir": str(out / "stack")},
            }
        )
    )
    return path
