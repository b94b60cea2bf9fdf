"""The main job, end to end: data -> shards -> stage 1 -> Ray sweeps of the stage-2 experts -> OOF
embeddings -> stack (meta-learner chosen by grouped CV) -> thresholds -> cascade on test -> report ->
``distrib predict`` of the cascade on a plain folder of the test images (``<out>/test_images`` ->
``<out>/predictions/predictions.csv``).

    distrib demo --out runs/demo                 # what `make demo` runs
    distrib demo --out /tmp/e2e --size tiny      # the end-to-end test setting

Every step calls the same library function as its own subcommand (``distrib data``, ``shard``,
``train``, ``tune``, ``stack``, ``thresholds``, ``cascade``); the demo only shrinks data sizes and
epochs through the experiment YAMLs in ``launch/configs/demo_*.yaml`` and dotted overrides.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from distrib.atomic import write_json
from distrib.errors import DistribError


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo setting; the experiment files are the same for every setting."""
    data_size: str  # build_demo_dataset size preset
    folds: int  # CV folds of the shards and the sweeps
    shard_size: int  # samples per shard (>= ranks x workers shards per split)
    overrides: tuple[str, ...] = ()  # dotted overrides applied to every stage
    stage1_overrides: tuple[str, ...] = ()  # extra overrides for the stage-1 filter
    expert_overrides: tuple[str, ...] = ()  # extra overrides for the stage-2 sweeps
    stack_overrides: tuple[str, ...] = field(default_factory=tuple)  # overrides of the stack/thresholds sections


PLANS = {
    "demo": DemoPlan(data_size="full", folds=5, shard_size=200),
    "tiny": DemoPlan(data_size="tiny", folds=2, shard_size=40,
                     overrides=("train.epochs=1", "train.max_steps=6", "train.latency_batches=2",
                                "embed.dim=8", "embed.anchors=16", "embed.fit_samples=64"),
                     stack_overrides=("stack.folds=2", "stack.n_estimators=30", "stack.bootstrap=50",
                                      "thresholds.bootstrap=20")),
}
class _Steps:
    """A progress bar over the pipeline's steps plus a timing record of each step."""

    def __init__(self, names: list[str]):
        self.bar = tqdm(total=len(names), desc="demo", unit="step", dynamic_ncols=True)
        self.times: dict[str, float] = {}

    def __call__(self, step: str, fn, *args, **kwargs):
        self.bar.set_description(f"demo: {step}")
        self.bar.write(f"==> {step}")
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.times[step] = round(time.time() - t0, 1)
        self.bar.update(1)
        return result


def run_demo(out: str | Path, stage1: str | Path, experts: list[str | Path], grid: str | Path, size: str = "demo",
             overrides=()) -> dict:
    """Run the whole pipeline into ``out`` from the ``stage1`` and ``experts`` experiment YAMLs and the
    experts' ``grid``; returns where the report and results are, and each step's seconds."""
    from distrib.cascade.run import run_cascade
    from distrib.config import load_config
    from distrib.demo.checks import histogram_leak_check
    from distrib.demo.data import build_demo_dataset
    from distrib.inference.predict import predict
    from distrib.data.shards import write_shards
    from distrib.stacking.stack import fit_stack
    from distrib.stacking.thresholds import fit_thresholds, load_predictions, select_fit_rows
    from distrib.training.trainer import run as train_run
    from distrib.sweep.driver import init_ray, run_sweep, stop_ray
    from distrib.sweep.grid import load_grid

    if size not in PLANS:
        raise DistribError(f"unknown demo size {size!r}; choose one of {', '.join(PLANS)}")
    plan, out = PLANS[size], Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [*plan.overrides, *overrides]
    # Resolve every config first: a bad key or value fails before any data, process or cluster starts.
    data_dir, shard_dir = out / "data", out / "shards"
    shard_ov = [f"data.shards={shard_dir}", f"tune.folds={plan.folds}"]
    stage1_cfg = load_config(stage1, [*shard_ov, "data.fold=-1", *plan.stage1_overrides, *common])
    expert_cfgs = [load_config(path, [*shard_ov, *plan.expert_overrides, *common, *plan.stack_overrides])
                   for path in experts]
    grid = load_grid(grid)
    steps = _Steps(["data", "shards", "stage 1", *[f"sweep {c.name}" for c in expert_cfgs],
                    "stack", "thresholds", "cascade", "predict"])

    summary = steps("data", build_demo_dataset, data_dir, size=plan.data_size, seed=0)
    leak = histogram_leak_check(data_dir)
    steps.bar.write(f"    colour-histogram leak check AUC {leak['auc']:.3f} (chance ~0.5)")
    steps("shards", write_shards, data_dir / "train_manifest.csv", shard_dir,
          val=data_dir / "val_manifest.csv", test=data_dir / "test_manifest.csv",
          folds=plan.folds, seed=0, shard_size=plan.shard_size, workers=2)
    stage1 = steps("stage 1", train_run, stage1_cfg, out / "stage1", resume=(out / "stage1" / "last_checkpoint").exists())

    oofs, sweeps = [], {}
    started = init_ray(out, None, None)  # one local cluster for both sweeps
    try:
        for cfg in expert_cfgs:
            sweep_dir = out / f"sweep_{cfg.name}"
            res = steps(f"sweep {cfg.name}", run_sweep, cfg, grid, sweep_dir)
            sweeps[cfg.name] = {k: res.get(k) for k in ("best", "rows", "timing") if k in res}
            oofs.append(sweep_dir / "oof_embeddings.parquet")
    finally:
        if started:
            stop_ray()

    stack_cfg = expert_cfgs[0]
    stack = steps("stack", fit_stack, oofs, out / "stack", stack_cfg.stack)
    meta_pred = out / "stack" / "meta_predictions.parquet"
    meta_oof = select_fit_rows(load_predictions(meta_pred), "oof", str(meta_pred))
    thresholds = steps("thresholds", fit_thresholds, meta_oof, stack_cfg.thresholds, out / "thresholds", name="meta")

    cascade_yaml = out / "cascade.yaml"
    cascade_yaml.write_text(yaml.safe_dump({
        "name": "demo deepfake cascade",
        "shards": str(shard_dir),
        "batch_size": 64,
        "recall": stack_cfg.thresholds.recall,
        "specificity": stack_cfg.thresholds.specificity,
        "bootstrap": stack_cfg.thresholds.bootstrap,
        "stage1": {"run": str(out / "stage1")},
        "stack": {"dir": str(out / "stack"), "rule": "youden"},
    }, sort_keys=False))
    results = steps("cascade", run_cascade, cascade_yaml, "test", out)
    folder = _test_image_folder(data_dir, out / "test_images")
    predicted = steps("predict", predict, cascade_yaml, folder, out / "predictions" / "predictions.csv")
    steps.bar.close()

    results.setdefault("pipeline", {})
    results["pipeline"].update({
        "size": size, "step_seconds": steps.times, "data": summary, "leak_check": leak,
        "stage1_metrics": {k: v for k, v in stage1.items() if isinstance(v, (int, float, str))},
        "sweeps": sweeps, "stack": {"meta": stack.get("meta"), "best_expert": stack.get("best_expert"),
                                    **stack.get("cv", {})},
        "meta_thresholds": thresholds,
        "predict": {k: predicted[k] for k in ("out", "images", "n", "skipped", "images_per_s", "decisions")},
    })
    write_json(out / "evaluation_results.json", results)
    _append_pipeline_report(out / "report.md", results["pipeline"])
    return {"report": str(out / "report.md"), "results": str(out / "evaluation_results.json"),
            "tensorboard": f"tensorboard --logdir {out} --host 127.0.0.1 --port 6006", "step_seconds": steps.times,
            "predictions": predicted["out"], "predicted_images": str(folder)}


def _test_image_folder(data_dir: Path, folder: Path) -> Path:
    """The test split's image files copied into one plain folder: what a user would point predict at."""
    import shutil

    import pandas as pd
    test = pd.read_csv(data_dir / "test_manifest.csv")
    folder.mkdir(parents=True, exist_ok=True)
    for rel in test["path"]:
        src = data_dir / rel
        shutil.copyfile(src, folder / "_".join(Path(rel).parts[-2:]))
    return folder


def _append_pipeline_report(report: Path, info: dict) -> None:
    """Add the pipeline's own facts (leak check, sweeps, step times) under the cascade's report."""
    lines = ["", "## Pipeline", "",
             f"Demo size `{info['size']}`; colour-histogram leak check AUC **{info['leak_check']['auc']:.3f}** "
             "(a colour-only classifier near 0.5 means colour does not give the label away).", "",
             "| expert sweep | best config | mean CV AUC | std | folds |", "|---|---|---|---|---|"]
    for name, sweep in info["sweeps"].items():
        best = sweep.get("best") or {}
        lines.append(f"| {name} | `{' '.join(best.get('overrides', [])) or '(base)'}` | "
                     f"{best.get('mean', float('nan')):.4f} | {best.get('std', float('nan')):.4f} | "
                     f"{len(best.get('run_dirs', []))} |")
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info["step_seconds"].items()]
    with open(report, "a") as f:
        f.write("\n".join(lines) + "\n")
