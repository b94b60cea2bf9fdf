"""A recipe resolved before anything runs: every experiment config and grid loaded and checked, the group
counts and embedding sizes the later steps need, and every model built once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from distrib.config import config_to_dict, load_config
from distrib.errors import DistribError
from distrib.recipes.config import Recipe, recipe_to_dict


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
