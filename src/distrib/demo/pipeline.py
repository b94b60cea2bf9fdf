"""The main job, end to end on the bundled demo data: build the data, run ``launch/recipes/demo.yaml``, then
``distrib predict`` the cascade on a plain folder of the test images (``<out>/test_images`` ->
``<out>/predictions/predictions.csv``).

    distrib demo --out runs/demo                 # what `make demo` runs
    distrib demo --out /tmp/e2e --size tiny      # the end-to-end test setting

The recipe (``distrib run``) does the rest: shards -> stage 1 -> Ray sweeps of the stage-2 experts ->
OOF embeddings -> LightGBM stack -> thresholds -> cascade on test -> report, each step the same library
call as its own subcommand. The demo only builds the data into ``OUT/data`` (whose manifests it
passes to the recipe) and shrinks sizes for ``--size tiny`` through recipe overrides.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from distrib.errors import DistribError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo setting; the recipe and experiment files are the same for every setting."""

    data_size: str  # build_demo_dataset size preset
    overrides: tuple[str, ...] = ()  # recipe overrides (data.folds=2, train.epochs=1, ...)


PLANS = {
    "demo": DemoPlan(data_size="full"),
    "tiny": DemoPlan(
        data_size="tiny",
        overrides=(
            "data.folds=2",
            "data.shard_size=40",
            "train.epochs=1",
            "train.max_steps=6",
            "train.latency_batches=2",
            "embed.dim=8",
            "embed.anchors=16",
            "embed.fit_samples=64",
            "stack.folds=2",
            "stack.n_estimators=30",
            "stack.bootstrap=50",
            "thresholds.bootstrap=20",
        ),
    ),
}


def run_demo(out: str | Path, recipe: str | Path, size: str = "demo", overrides=()) -> dict:
    """Build the demo data into ``out/data`` and run ``recipe`` on it into ``out``; returns where the
    report and results are, and each step's seconds."""
    from distrib.demo.checks import histogram_leak_check
    from distrib.demo.data import build_demo_dataset
    from distrib.inference.predict import predict
    from distrib.recipes import load_recipe, run_recipe

    if size not in PLANS:
        raise DistribError(f"unknown demo size {size!r}; choose one of {', '.join(PLANS)}")
    plan, out = PLANS[size], Path(out).resolve()
    data_dir = out / "data"
    recipe_overrides = [
        *(f"data.{k}={data_dir / f'{k}_manifest.csv'}" for k in ("train", "val", "test")),
        *plan.overrides,
        *overrides,
    ]
    load_recipe(recipe, recipe_overrides)  # a bad key or value fails before the data is built
    t0 = time.time()
    summary = build_demo_dataset(data_dir, size=plan.data_size, seed=0)
    leak = histogram_leak_check(data_dir)
    summary = {**summary, "build_and_leak_check_seconds": round(time.time() - t0, 1)}
    log_line = f"colour-histogram leak check AUC {leak['auc']:.3f} (chance ~0.5)"
    res = run_recipe(recipe, out, recipe_overrides, extra={"size": size, "data": summary, "leak_check": leak})
    folder = _test_image_folder(data_dir, out / "test_images")  # what a user would point predict at
    preds, summary_json = out / "predictions" / "predictions.csv", out / "predictions" / "predictions_summary.json"
    # any step that re-ran rewrote the cascade YAML or the results: predict again then, else keep the last one
    inputs = [p for p in (out / "cascade.yaml", out / "evaluation_results.json") if p.is_file()]
    if summary_json.is_file() and all(summary_json.stat().st_mtime >= p.stat().st_mtime for p in inputs):
        log.info("predict: done (%s is newer than the cascade and its results), skipped", summary_json)
        predicted = json.loads(summary_json.read_text())
    else:
        predicted = predict(out / "cascade.yaml", folder, preds)
    return {
        **res,
        "leak_check": log_line,
        "predictions": predicted["out"],
        "predicted_images": str(folder),
        "predict": {k: predicted[k] for k in ("n", "skipped", "images_per_s", "decisions")},
    }


def _test_image_folder(data_dir: Path, folder: Path) -> Path:
    """The test split's image files copied into one plain folder."""
    import shutil

    import pandas as pd

    test = pd.read_csv(data_dir / "test_manifest.csv")
    folder.mkdir(parents=True, exist_ok=True)
    for rel in test["path"]:
        shutil.copyfile(data_dir / rel, folder / "_".join(Path(rel).parts[-2:]))
    return folder
