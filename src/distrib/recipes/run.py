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
OWNED = (
    "shards",
    "stage1",
    "stage1_config.yaml",
    "stack",
    "thresholds",
    "cascade.yaml",
    "cascade_predictions.csv",
    "report.md",
    "evaluation_results.json",
    "stage1_thresholds",
    "stage3",
    "student",
    STATE,
)  # cleared by overwrite (+ sweep_*, thresholds_*)


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
            raise DistribError(
                f"recipe data.{key}: manifest not found: {path} (paths resolve against the recipe's "
                "folder; on the command line, against the current one)"
            )
    _check_groups(recipe, folds)
    common = [f"data.shards={shard_dir}", f"tune.folds={folds}", *recipe.overrides]
    stage1 = (
        load_config(recipe.stage1.experiment, [*common, "data.fold=-1", *recipe.stage1.overrides])
        if recipe.stage1.experiment
        else None
    )
    sh = recipe.shootout
    student = load_config(sh.student, [*common, "data.fold=-1", *sh.student_overrides]) if sh.student else None
    experts = []
    for e in recipe.experts:
        cfg = load_config(e.experiment, [*common, *e.overrides])
        experts.append((cfg, load_grid(e.grid) if e.grid else check_grid(cfg.tune.grid)))
    _check_embed_dims(d, experts)
    names = [c.name for c, _ in experts]
    if len(set(names)) != len(names):
        raise DistribError(
            f"recipe experts share a name ({names}); give each a distinct 'name' "
            "(e.g. overrides: [name=expert_b]), it names its sweep folder"
        )
    return {
        "shard_dir": shard_dir,
        "folds": folds,
        "stage1": stage1,
        "experts": experts,
        "student": student,
        "common": common,
        "saved": {
            "recipe": recipe_to_dict(recipe),
            "stage1": stage1 and config_to_dict(stage1),
            "student": student and config_to_dict(student),
            "experts": [{"config": config_to_dict(c), "grid": g} for c, g in experts],
            "manifests": {k: _sha(getattr(d, k)) for k in ("train", "val", "test")},
        },
    }


def _check_groups(recipe: Recipe, folds: int) -> None:
    """Whole groups per fold, in the shard folds and in the meta-model's group K-fold over the OOF table (the
    train split): too few groups fail now, not at the shard step or after every model has trained."""
    from distrib.errors import DataError

    d = recipe.data
    if d.shards:
        from distrib.data.index import read_index

        index = read_index(d.shards)
        if "groups" not in index:
            return
        n, where = len(index["groups"]), f"{d.shards} (train split)"
    else:
        from distrib.data.manifest import read_manifest

        n, where = len({r["group"] for r in read_manifest(d.train, "train")}), str(d.train)
        if n < folds:
            raise DataError(
                f"data.folds={folds} but {where} has {n} group(s), and every fold needs whole groups; "
                f"set data.folds={max(2, n)} or fewer (in the recipe or as data.folds=N on the command "
                "line), or add groups"
            )
    if recipe.mode == "cascade" and n < recipe.stack.folds:
        raise DataError(
            f"stack.folds={recipe.stack.folds}: the meta-model's group K-fold needs that many groups in "
            f"the train split, but {where} has {n}; set stack.folds={max(2, n)} or fewer (in the recipe "
            "or as stack.folds=N on the command line), or add groups"
        )


def _check_embed_dims(d, experts) -> None:
    """An expert's embed.dim needs that many val images (the alignment anchors): fail now, not after its sweep."""
    from distrib.stacking.embed import check_val_anchors

    if d.shards:
        from distrib.data.index import read_index

        n_val, where = read_index(d.shards).get("split_counts", {}).get("val", 0), f"{d.shards} (val split)"
    elif d.val:
        import pandas as pd

        n_val, where = len(pd.read_csv(d.val)), str(d.val)
    else:
        return
    for cfg, _ in experts:
        if cfg.tune.embed_best:
            check_val_anchors(n_val, cfg.embed, f"{where} (expert {cfg.name})", fix="overrides.embed.dim")


def check_models(res: dict) -> list[str]:
    """Every model of the recipe (stage 1, student, experts) built once with one forward
    (``training.setup.check_models``), before anything is written or started. Returns the names built."""
    from distrib.training.setup import check_models as check

    return check([res["stage1"], res["student"], *(c for c, _ in res["experts"])])


DOWNSTREAM = ("name", "stack", "thresholds", "cascade")  # recipe sections read only after the sweeps


def _strip_overrides(recipe: dict) -> dict:
    """The recipe without its override lists: their effect is compared in the resolved configs instead."""
    return {
        **recipe,
        "overrides": [],
        "stage1": {**recipe["stage1"], "overrides": []},
        "experts": [{**e, "overrides": []} for e in recipe["experts"]],
    }


def plan_changes(old: dict, new: dict) -> tuple[list[str], bool, list[str]]:
    """What a changed recipe means for a run dir: (refused changes, redo the steps after the sweeps,
    experts whose OOF table must be re-embedded from the same fold runs).

    Refused: anything that shaped what was trained (data, manifests, stage 1's or an expert's training
    fields, a grid, the expert list). Allowed: the stack/thresholds/cascade sections and the name (the
    steps after the sweeps re-run), and any SWEEP_RESUME_SAFE field of an experiment (``embed.*`` re-embeds
    that expert's best fold runs, nothing is retrained).
    """
    from distrib.config import SWEEP_RESUME_SAFE, allowed_change, config_changes

    refused, redo_tail, reembed = [], False, []
    ro, rn = _strip_overrides(old["recipe"]), _strip_overrides(new["recipe"])
    for key in sorted(set(ro) | set(rn)):
        if ro.get(key) != rn.get(key):
            redo_tail = redo_tail or key in DOWNSTREAM
            refused += [] if key in DOWNSTREAM else [f"recipe {key}"]
    refused += ["manifests"] if old.get("manifests") != new.get("manifests") else []
    pairs = [(k, old.get(k), new.get(k)) for k in ("stage1", "student")]
    if len(old["experts"]) != len(new["experts"]):
        refused.append("the expert list")
    else:
        pairs += [
            (f"expert {b['config']['name']}", a["config"], b["config"]) for a, b in zip(old["experts"], new["experts"])
        ]
        refused += [
            f"expert {b['config']['name']} grid"
            for a, b in zip(old["experts"], new["experts"])
            if a["grid"] != b["grid"]
        ]
    for what, a, b in pairs:
        if (a is None) != (b is None):
            refused.append(what)
            continue
        changes = config_changes(a, b) if a is not None else []
        refused += [f"{what} {k}: {x!r} -> {y!r}" for k, x, y in changes if not allowed_change(k, SWEEP_RESUME_SAFE)]
        if what.startswith("expert ") and any(k.startswith("embed.") for k, _, _ in changes):
            reembed.append(b["name"])
    return refused, redo_tail or bool(reembed), reembed


def _check_saved(out: Path, saved: dict, overwrite: bool) -> None:
    path = out / SAVED
    old = yaml.safe_load(path.read_text()) if path.is_file() else None
    changed = old is not None and old != saved and not overwrite
    if changed and not (_read_json(out / STATE) or (out / "stage1").exists() or any(out.glob("sweep_*"))):
        log.info(f"replacing {path}: the run that saved it finished no step")  # nothing was trained
    elif changed:
        refused, redo_tail, reembed = plan_changes(old, saved)
        if refused:
            raise DistribError(
                f"{out} holds a run of a different recipe ({'; '.join(refused)} changed since "
                f"{path} was saved); pass --overwrite to clear its outputs and start over, "
                "or choose a new --out"
            )
        state_path = out / STATE
        state = _read_json(state_path)
        if redo_tail:  # the steps after the sweeps run again; finished training is kept
            state = {k: v for k, v in state.items() if k in ("shards", "stage 1") or k.startswith("sweep ")}
        for name in reembed:  # same fold runs, new embed settings: the OOF table is extracted again
            (out / f"sweep_{name}" / "oof_embeddings.parquet").unlink(missing_ok=True)
        log.warning(
            f"recipe changed only after training ({'re-embed ' + ', '.join(reembed) + '; ' if reembed else ''}"
            f"{'re-running stack, thresholds, cascade and report' if redo_tail else 'nothing to re-run'}); "
            "finished stage 1 and sweeps are kept"
        )
        if state_path.is_file():
            write_json(state_path, state)
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
        self.state = _read_json(self.state_path)
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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


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
    _check_saved(out, res["saved"], overwrite)
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
        from distrib.recipes.shootout import run_shootout_steps

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
        results = _read_json(out / "evaluation_results.json")
        results["pipeline"] = {
            **(extra or {}),
            "recipe": str(Path(path).resolve()),
            "name": recipe.name,
            "step_seconds": dict(steps.times),
            "skipped": list(steps.skipped),
            "wall_seconds_this_run": round(time.time() - t_start, 1),
            "stage1_metrics": _stage1_metrics(_read_json(s1 / "evaluation_results.json")),
            "sweeps": {
                c.name: {
                    k: v
                    for k, v in _read_json(out / f"sweep_{c.name}" / "sweep_results.json").items()
                    if k in ("best", "trials", "done", "fit_s")
                }
                for c, _ in res["experts"]
            },
            "stack": _read_json(stack_dir / "stack_results.json").get("cv"),
            "meta_thresholds": _read_json(out / "thresholds" / "meta_thresholds.json"),
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


def finish(steps: Steps, out: Path) -> dict:
    steps.bar.close()
    return {
        "report": str(out / "report.md"),
        "results": str(out / "evaluation_results.json"),
        "tensorboard": f"tensorboard --logdir {out} --host 127.0.0.1 --port 6006",
        "step_seconds": steps.times,
        "skipped": steps.skipped,
    }
