"""Run a recipe: shard -> stage 1 -> tune + embed each expert -> stack -> thresholds -> cascade -> report.

    distrib run launch/recipes/deepfake_cascade.yaml --out runs/deepfake [--overwrite] [data.folds=3 ...]

Every step is the library call of its own subcommand (``shard``, ``train``, ``tune``, ``stack``,
``thresholds``, ``cascade``). Everything resolves first: a bad key, value or path in the recipe or any
experiment/grid fails before a file, process group or Ray cluster exists. The resolved recipe (plus
each resolved experiment config, grid and manifest checksum) is saved as ``DIR/recipe.yaml``; a
second run with a different one is refused unless ``overwrite`` (which clears the recipe's outputs).
``DIR/recipe_state.json`` records each finished step and its seconds: a step recorded there whose
outputs exist is skipped, so a killed run continues with the same command (stage 1 and the sweeps
also resume inside their own checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from distrib.atomic import write_json, write_text
from distrib.config import config_to_dict, load_config
from distrib.errors import DistribError
from distrib.recipes.config import Recipe, load_recipe, recipe_to_dict
from distrib.recipes.report import append_pipeline_report

log = logging.getLogger(__name__)
SAVED, STATE = "recipe.yaml", "recipe_state.json"
OWNED = ("shards", "stage1", "stack", "thresholds", "cascade.yaml", "cascade_predictions.csv", "report.md",
         "evaluation_results.json", "stage1_thresholds", "stage3", "student", STATE)  # cleared by overwrite (+ sweep_*, thresholds_*)


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path and Path(path).is_file() else ""


def resolve(recipe: Recipe, out: Path) -> dict:
    """Every experiment config and grid of the recipe, validated; nothing is written."""
    from distrib.data.index import read_index
    from distrib.sweep.grid import check_grid, load_grid

    d = recipe.data
    shard_dir = d.shards or str(out / "shards")
    folds = int(read_index(d.shards)["folds"]) if d.shards else d.folds
    for key in ("train", "val", "test"):
        path = getattr(d, key)
        if path and not d.shards and not Path(path).is_file():
            raise DistribError(f"recipe data.{key}: manifest not found: {path} (paths resolve against the recipe's "
                               "folder; on the command line, against the current one)")
    common = [f"data.shards={shard_dir}", f"tune.folds={folds}", *recipe.overrides]
    stage1 = load_config(recipe.stage1.experiment, [*common, "data.fold=-1", *recipe.stage1.overrides]) \
        if recipe.stage1.experiment else None
    sh = recipe.shootout
    student = load_config(sh.student, [*common, "data.fold=-1", *sh.student_overrides]) if sh.student else None
    experts = []
    for e in recipe.experts:
        cfg = load_config(e.experiment, [*common, *e.overrides])
        experts.append((cfg, load_grid(e.grid) if e.grid else check_grid(cfg.tune.grid)))
    names = [c.name for c, _ in experts]
    if len(set(names)) != len(names):
        raise DistribError(f"recipe experts share a name ({names}); give each a distinct 'name' "
                           "(e.g. overrides: [name=expert_b]), it names its sweep folder")
    return {"shard_dir": shard_dir, "folds": folds, "stage1": stage1, "experts": experts, "student": student,
            "common": common,
            "saved": {"recipe": recipe_to_dict(recipe), "stage1": stage1 and config_to_dict(stage1),
                      "student": student and config_to_dict(student),
                      "experts": [{"config": config_to_dict(c), "grid": g} for c, g in experts],
                      "manifests": {k: _sha(getattr(d, k)) for k in ("train", "val", "test")}}}


def fetch_pretrained(res: dict) -> list[str]:
    """Build each ``model.pretrained`` model once, here: a missing hub weight (offline, empty cache) fails
    with its clear error before any file, process group or Ray trial exists, and online the weights land
    in the Hugging Face cache once instead of in every trial at the same time."""
    from distrib.models import build_model
    names = []
    for cfg in [res["stage1"], res["student"], *(c for c, _ in res["experts"])]:
        if cfg is not None and cfg.model.pretrained and not cfg.model.pretrained_file and cfg.model.name not in names:
            build_model(cfg.model)
            names.append(cfg.model.name)
    return names


def _check_saved(out: Path, saved: dict, overwrite: bool) -> None:
    path = out / SAVED
    old = yaml.safe_load(path.read_text()) if path.is_file() else None
    if old is not None and old != saved:
        if not overwrite:
            changed = [k for k in saved if old.get(k) != saved[k]]
            raise DistribError(f"{out} holds a run of a different recipe ({', '.join(changed)} changed since "
                               f"{path} was saved); pass --overwrite to clear its outputs and start over, "
                               "or choose a new --out")
    if overwrite and out.is_dir():
        for p in [*(out / n for n in OWNED), *out.glob("sweep_*"), *out.glob("thresholds_*")]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(saved, sort_keys=False))


class Steps:
    """One tqdm bar over the steps; each step's seconds; steps already done (with their outputs) skip."""

    def __init__(self, out: Path, names: list[str], desc: str):
        self.state_path = out / STATE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.bar = tqdm(total=len(names), desc=desc, unit="step", dynamic_ncols=True)
        self.times: dict[str, float] = {}
        self.skipped: list[str] = []

    def done(self, step: str, outputs) -> bool:
        if step in self.state and all(Path(p).exists() for p in outputs):
            self.times[step] = self.state[step]
            self.skipped.append(step)
            self.bar.write(f"==> {step}: done ({self.state[step]} s in an earlier run), skipped")
            self.bar.update(1)
            return True
        return False

    def __call__(self, step: str, outputs, fn, *args, **kwargs):
        """Run ``fn`` unless ``step`` finished before with all ``outputs`` (None: the caller checked);
        returns its result, or None when skipped."""
        if outputs is not None and self.done(step, outputs):
            return None
        self.bar.set_description(f"{self.bar.desc.split(':')[0]}: {step}")
        self.bar.write(f"==> {step}")
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.times[step] = self.state[step] = round(time.time() - t0, 1)
        write_json(self.state_path, self.state)
        self.bar.update(1)
        return result


def _cascade_yaml(recipe: Recipe, res: dict, out: Path) -> Path:
    path = out / "cascade.yaml"
    write_text(path, yaml.safe_dump({
        "name": recipe.name, "shards": res["shard_dir"], "batch_size": recipe.cascade.batch_size,
        "recall": recipe.thresholds.recall, "specificity": recipe.thresholds.specificity,
        "bootstrap": recipe.thresholds.bootstrap, "evaluate_all_stages": recipe.cascade.evaluate_all_stages,
        "stage1": {"run": str(out / "stage1")},
        "stack": {"dir": str(out / "stack"), "rule": recipe.cascade.rule},
    }, sort_keys=False))
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _stage1_metrics(res: dict) -> dict:
    """Stage 1's val metrics (threshold-free ones from metrics_at_0.5) plus its scalar facts."""
    m = res.get("metrics_at_0.5", {})
    return {**{k: m.get(k) for k in ("auc", "eer", "ap", "n")},
            **{k: v for k, v in res.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}}


def run_recipe(path: str | Path, out: str | Path, overrides=(), overwrite: bool = False, address: str | None = None,
               num_cpus: int | None = None, extra: dict | None = None) -> dict:
    """Run the recipe at ``path`` into ``out``; returns where the report and results are and each step's seconds.

    ``extra`` is merged into the results' ``pipeline`` record (the demo adds its data summary there).
    """
    from distrib.cascade.run import run_cascade
    from distrib.data.shards import write_shards
    from distrib.runs import find_checkpoint
    from distrib.stacking.stack import fit_stack
    from distrib.stacking.thresholds import fit_thresholds, load_predictions, select_fit_rows
    from distrib.sweep.driver import init_ray, run_sweep
    from distrib.training.trainer import run as train_run

    t_start, out = time.time(), Path(out).resolve()
    recipe = load_recipe(path, overrides)
    res = resolve(recipe, out)  # every config and grid validated before anything is written or started
    fetch_pretrained(res)
    _check_saved(out, res["saved"], overwrite)
    d, shard_dir = recipe.data, Path(res["shard_dir"])
    shootout = recipe.mode == "shootout"
    tail = ([f"thresholds {c.name}" for c, _ in res["experts"]] + (["student"] if recipe.shootout.student else [])
            if shootout else ["stack", "thresholds", "cascade"])
    names = [*([] if d.shards else ["shards"]), *(["stage 1"] if res["stage1"] else []),
             *[f"sweep {c.name}" for c, _ in res["experts"]], *tail, "report"]
    steps = Steps(out, names, recipe.name)

    if not d.shards:
        steps("shards", [shard_dir / "index.json"], write_shards, d.train, shard_dir, val=d.val or None,
              test=d.test or None, folds=d.folds, seed=d.seed, shard_size=d.shard_size, workers=d.workers,
              positive=d.positive or None)
    s1 = out / "stage1"
    if res["stage1"]:
        steps("stage 1", [s1 / "evaluation_results.json", s1 / "best_model.pth"],
              lambda: train_run(res["stage1"], s1, resume=find_checkpoint(s1) is not None))

    started, oofs = False, []
    try:
        for cfg, grid in res["experts"]:
            sweep_dir = out / f"sweep_{cfg.name}"
            oofs.append(sweep_dir / "oof_embeddings.parquet")
            if steps.done(f"sweep {cfg.name}", [oofs[-1], sweep_dir / "sweep_results.json"]):
                continue
            started = started or init_ray(out, address, num_cpus)  # one cluster for every sweep
            summary = steps(f"sweep {cfg.name}", None, run_sweep, cfg, grid, sweep_dir)
            if not summary.get("best"):
                raise DistribError(f"sweep {cfg.name} in {sweep_dir} has no config that finished every fold "
                                   f"({summary.get('best_error', '')}; errors: {summary.get('errors')}); fix the "
                                   "cause and re-run the same command to continue")
    finally:
        if started:
            import ray
            ray.shutdown()

    if shootout:
        from distrib.recipes.shootout import run_shootout_steps
        return run_shootout_steps(recipe, res, out, steps, path, t_start, extra)
    stack_dir = out / "stack"
    steps("stack", [stack_dir / n for n in ("meta_model.txt", "meta_features.json", "stack_results.json",
                                            "meta_predictions.parquet")], fit_stack, oofs, stack_dir, recipe.stack)
    meta_pred = stack_dir / "meta_predictions.parquet"
    steps("thresholds", [out / "thresholds" / "meta_thresholds.json"], lambda: fit_thresholds(
        select_fit_rows(load_predictions(meta_pred), recipe.thresholds.fit_split, str(meta_pred)),
        recipe.thresholds, out / "thresholds", name="meta"))
    steps("cascade", [out / "cascade_predictions.csv", out / "evaluation_results.json", out / "report.md"],
          lambda: run_cascade(_cascade_yaml(recipe, res, out), recipe.cascade.split, out))

    def report() -> dict:
        results = _read_json(out / "evaluation_results.json")
        results["pipeline"] = {
            **(extra or {}), "recipe": str(Path(path).resolve()), "name": recipe.name,
            "step_seconds": dict(steps.times), "skipped": list(steps.skipped),
            "wall_seconds_this_run": round(time.time() - t_start, 1),
            "stage1_metrics": _stage1_metrics(_read_json(s1 / "evaluation_results.json")),
            "sweeps": {c.name: {k: v for k, v in _read_json(out / f"sweep_{c.name}" / "sweep_results.json").items()
                                if k in ("best", "trials", "done", "fit_s")} for c, _ in res["experts"]},
            "stack": _read_json(stack_dir / "stack_results.json").get("cv"),
            "meta_thresholds": _read_json(out / "thresholds" / "meta_thresholds.json"),
        }
        write_json(out / "evaluation_results.json", results)
        append_pipeline_report(out / "report.md", results["pipeline"])
        return results
    steps("report", [], report)
    return finish(steps, out)


def finish(steps: Steps, out: Path) -> dict:
    steps.bar.close()
    return {"report": str(out / "report.md"), "results": str(out / "evaluation_results.json"),
            "tensorboard": f"tensorboard --logdir {out} --host 127.0.0.1 --port 6006",
            "step_seconds": steps.times, "skipped": steps.skipped}
