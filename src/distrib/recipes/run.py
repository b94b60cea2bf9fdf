"""Run a recipe: shard -> stage 1 -> tune + embed each expert -> stack -> thresholds -> cascade -> report.

    distrib run launch/recipes/deepfake_cascade.yaml --out runs/deepfake [--overwrite] [data.folds=3 ...]

Every step is the library call of its own subcommand (``shard``, ``train``, ``tune``, ``stack``,
``thresholds``, ``cascade``). Everything resolves first: a bad key, value or path in the recipe or any
experiment/grid fails before a file, process group or Ray cluster exists. The resolved recipe (plus
each resolved experiment config, grid and manifest checksum) is saved as ``DIR/recipe.yaml``; a
second run with a different one is refused unless ``overwrite`` (which clears the recipe's outputs), once
a step has finished (before that, nothing was trained and the new one replaces it).
``DIR/recipe_state.json`` records each finished step and its seconds: a step recorded there whose
outputs exist is skipped, so a killed run continues with the same command (stage 1 and the sweeps
also resume inside their own checkpoints).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from distrib.atomic import write_json, write_text
from distrib.config import config_to_dict
from distrib.errors import DistribError
from distrib.recipes.config import Recipe, load_recipe
from distrib.recipes.report import append_pipeline_report
from distrib.recipes.resolve import check_models, resolve
from distrib.recipes.shootout import run_shootout_steps
from distrib.recipes.state import Steps, check_saved, finish, read_json

log = logging.getLogger(__name__)


def _cascade_yaml(recipe: Recipe, res: dict, out: Path) -> Path:
    path = out / "cascade.yaml"
    write_text(
        path,
        yaml.safe_dump(
            {
                "name": recipe.name,
                "shards": res["shard_dir"],
                "batch_size": recipe.cascade.batch_size,
                "recall": recipe.thresholds.recall,
                "specificity": recipe.thresholds.specificity,
                "bootstrap": recipe.thresholds.bootstrap,
                "evaluate_all_stages": recipe.cascade.evaluate_all_stages,
                "group_agg": recipe.stack.group_agg,
                "stage1": {"run": str(out / "stage1")},
                "stack": {"dir": str(out / "stack"), "rule": recipe.cascade.rule},
            },
            sort_keys=False,
        ),
    )
    return path


def _stage1_metrics(res: dict) -> dict:
    """Stage 1's val metrics (threshold-free ones from metrics_at_0.5) plus its scalar facts."""
    m = res.get("metrics_at_0.5", {})
    return {
        **{k: m.get(k) for k in ("auc", "eer", "ap", "n")},
        **{k: v for k, v in res.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)},
    }


def run_recipe(
    path: str | Path,
    out: str | Path,
    overrides=(),
    overwrite: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    extra: dict | None = None,
) -> dict:
    """Run the recipe at ``path`` into ``out``; returns where the report and results are and each step's seconds.

    ``extra`` is merged into the results' ``pipeline`` record (the demo adds its data summary there).
    """
    from distrib.cascade.run import run_cascade
    from distrib.data.shards import write_shards
    from distrib.runs import find_checkpoint
    from distrib.stacking.embed import extract_oof
    from distrib.stacking.stack import fit_stack
    from distrib.stacking.thresholds import fit_thresholds, load_predictions, select_fit_rows
    from distrib.sweep.driver import init_ray, run_sweep, stop_ray
    from distrib.sweep.report import best_run_dirs
    from distrib.training.trainer import run as train_run

    t_start, out = time.time(), Path(out).resolve()
    recipe = load_recipe(path, overrides)
    res = resolve(recipe, out)  # every config and grid validated before anything is written or started
    check_models(res)  # sizes and hub weights, before anything is written or started
    check_saved(out, res["saved"], overwrite)
    d, shard_dir = recipe.data, Path(res["shard_dir"])
    shootout = recipe.mode == "shootout"
    tail = (
        [f"thresholds {c.name}" for c, _ in res["experts"]] + (["student"] if recipe.shootout.student else [])
        if shootout
        else ["stack", "thresholds", "cascade"]
    )
    names = [
        *([] if d.shards else ["shards"]),
        *(["stage 1"] if res["stage1"] else []),
        *[f"sweep {c.name}" for c, _ in res["experts"]],
        *tail,
        "report",
    ]
    steps = Steps(out, names, recipe.name)

    if not d.shards:
        steps(
            "shards",
            [shard_dir / "index.json"],
            write_shards,
            d.train,
            shard_dir,
            val=d.val or None,
            test=d.test or None,
            folds=d.folds,
            seed=d.seed,
            shard_size=d.shard_size,
            workers=d.workers,
            positive=d.positive or None,
            names=d.classes or None,
        )
    s1 = out / "stage1"
    if res["stage1"] and recipe.stage1.accelerate_config:
        steps(
            "stage 1",
            [s1 / "evaluation_results.json", s1 / "best_model.pth"],
            launch_stage1,
            res["stage1"],
            s1,
            recipe.stage1.accelerate_config,
            recipe.stage1.accelerate_args,
        )
    elif res["stage1"]:
        steps(
            "stage 1",
            [s1 / "evaluation_results.json", s1 / "best_model.pth"],
            lambda: train_run(res["stage1"], s1, resume=find_checkpoint(s1) is not None),
        )

    started, oofs = False, []
    try:
        for cfg, grid in res["experts"]:
            sweep_dir = out / f"sweep_{cfg.name}"
            oofs.append(sweep_dir / "oof_embeddings.parquet")
            if steps.done(f"sweep {cfg.name}", [oofs[-1], sweep_dir / "sweep_results.json"]):
                continue
            if f"sweep {cfg.name}" in steps.state and (sweep_dir / "sweep_results.json").is_file():
                # finished sweep, OOF table gone (embed.* changed, or killed mid-extraction): re-embed, no retraining
                steps(f"sweep {cfg.name}", None, extract_oof, best_run_dirs(sweep_dir), oofs[-1], cfg.embed)
                continue
            started = started or init_ray(
                out,
                address,
                num_cpus,  # one cluster for every sweep
                fork_server=cfg.tune.fork_server,
            )
            summary = steps(f"sweep {cfg.name}", None, run_sweep, cfg, grid, sweep_dir, models_checked=True)
            if not summary.get("best"):
                raise DistribError(
                    f"sweep {cfg.name} in {sweep_dir} has no config that finished every fold "
                    f"({summary.get('best_error', '')}; errors: {summary.get('errors')}); fix the "
                    "cause and re-run the same command to continue"
                )
    finally:
        if started:  # stop_ray, not ray.shutdown: it also stops the cluster's agents and removes its temp dir
            stop_ray()

    if shootout:
        return run_shootout_steps(recipe, res, out, steps, path, t_start, extra)
    stack_dir = out / "stack"
    steps(
        "stack",
        [
            stack_dir / n
            for n in ("meta_model.json", "meta_features.json", "stack_results.json", "meta_predictions.parquet")
        ],
        fit_stack,
        oofs,
        stack_dir,
        recipe.stack,
    )
    meta_pred = stack_dir / "meta_predictions.parquet"
    steps(
        "thresholds",
        [out / "thresholds" / "meta_thresholds.json"],
        lambda: fit_thresholds(
            select_fit_rows(load_predictions(meta_pred), recipe.thresholds.fit_split, str(meta_pred)),
            recipe.thresholds,
            out / "thresholds",
            name="meta",
        ),
    )
    steps(
        "cascade",
        [out / "cascade_predictions.csv", out / "evaluation_results.json", out / "report.md"],
        lambda: run_cascade(_cascade_yaml(recipe, res, out), recipe.cascade.split, out),
    )

    def report() -> dict:
        results = read_json(out / "evaluation_results.json")
        results["pipeline"] = {
            **(extra or {}),
            "recipe": str(Path(path).resolve()),
            "name": recipe.name,
            "step_seconds": dict(steps.times),
            "skipped": list(steps.skipped),
            "wall_seconds_this_run": round(time.time() - t_start, 1),
            "stage1_metrics": _stage1_metrics(read_json(s1 / "evaluation_results.json")),
            "sweeps": {
                c.name: {
                    k: v
                    for k, v in read_json(out / f"sweep_{c.name}" / "sweep_results.json").items()
                    if k in ("best", "trials", "done", "fit_s")
                }
                for c, _ in res["experts"]
            },
            "stack": read_json(stack_dir / "stack_results.json").get("cv"),
            "meta_thresholds": read_json(out / "thresholds" / "meta_thresholds.json"),
        }
        write_json(out / "evaluation_results.json", results)
        append_pipeline_report(out / "report.md", results["pipeline"])
        return results

    steps("report", [], report)
    return finish(steps, out)


def launch_stage1(cfg, run_dir: Path, accelerate_config: str, accelerate_args=()) -> None:
    """Stage 1 as ``accelerate launch --config_file CONFIG -m distrib train`` (DDP or DeepSpeed on every
    process the accelerate config names), resuming from its checkpoint when a killed run left one."""
    import subprocess
    import sys

    from distrib.runs import find_checkpoint

    if not Path(accelerate_config).is_file():
        raise DistribError(
            f"recipe stage1.accelerate_config: {accelerate_config} not found (the repo ships "
            "accelerate_config.yaml; write one with 'accelerate config')"
        )
    config_path = run_dir.parent / "stage1_config.yaml"  # the resolved experiment, replayable by hand
    write_text(config_path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        *map(str, accelerate_args),
        "-m",
        "distrib",
        "train",
        str(config_path),
        "--out",
        str(run_dir),
        *(["--resume"] if find_checkpoint(run_dir) is not None else []),
    ]
    log.info("stage 1: %s", " ".join(cmd))
    code = subprocess.run(cmd).returncode
    if code:
        raise DistribError(
            f"stage 1 under accelerate launch exited {code} (its log is above); fix the cause and "
            "re-run the same command: stage 1 continues from its last checkpoint"
        )
