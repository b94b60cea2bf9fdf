"""A recipe's run folder between runs: the saved resolved recipe (``recipe.yaml``), what a changed recipe
may keep, and ``recipe_state.json``'s finished steps (``Steps``), so a killed run continues with the same command.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from distrib.atomic import write_json, write_text
from distrib.errors import DistribError

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


def check_saved(out: Path, saved: dict, overwrite: bool) -> None:
    path = out / SAVED
    old = yaml.safe_load(path.read_text()) if path.is_file() else None
    changed = old is not None and old != saved and not overwrite
    if changed and not (read_json(out / STATE) or (out / "stage1").exists() or any(out.glob("sweep_*"))):
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
        state = read_json(state_path)
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
        self.state = read_json(self.state_path)
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


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def finish(steps: Steps, out: Path) -> dict:
    steps.bar.close()
    return {
        "report": str(out / "report.md"),
        "results": str(out / "evaluation_results.json"),
        "tensorboard": f"tensorboard --logdir {out} --host 127.0.0.1 --port 6006",
        "step_seconds": steps.times,
        "skipped": steps.skipped,
    }
