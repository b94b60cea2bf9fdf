"""Recipes: every shipped recipe loads; `distrib run` runs a tiny recipe end to end on its own manifests,
survives a SIGKILL mid-run (same command continues, finished steps are skipped) and refuses a changed recipe."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import PYTHON, REPO, subprocess_env
from distrib.config import ConfigError, load_config
from distrib.errors import DataError
from distrib.recipes import load_recipe
from distrib.sweep.grid import load_grid

RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))


def test_shipped_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"demo", "deepfake_cascade", "pit"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_with_its_experiments_and_grids(path):
    recipe = load_recipe(path)
    for experiment, overrides in [
        (recipe.stage1.experiment, recipe.stage1.overrides),
        (recipe.shootout.student, recipe.shootout.student_overrides),
        *[(e.experiment, e.overrides) for e in recipe.experts],
    ]:
        if experiment:
            load_config(experiment, [*recipe.overrides, *overrides])
    for e in recipe.experts:
        if e.grid:
            load_grid(e.grid)


def test_recipe_unknown_key_names_the_closest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"train": "t.csv", "test": "t.csv", "fold": 2}}))
    with pytest.raises(ConfigError, match="data.fold.*did you mean 'data.folds'"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="stack.n_estimator'.*did you mean 'stack.n_estimators'"):
        load_recipe(RECIPES[0], ["stack.n_estimator=3"])
    with pytest.raises(ConfigError, match="'data.fols'.*did you mean 'data.folds'"):  # a typo of a recipe key
        load_recipe(RECIPES[0], ["data.fols=2"])  # (was forwarded to the experiments, which suggested data.fold)
    recipe = load_recipe(REPO / "launch" / "recipes" / "demo.yaml", ["train.epochs=1", "data.folds=2"])
    assert recipe.overrides == ["train.epochs=1"] and recipe.data.folds == 2  # experiment key vs recipe key
    assert Path(recipe.stage1.experiment).is_absolute() and Path(recipe.stage1.experiment).is_file()


def _row(name, auc, feasible=True, latency=5.0, size=10.0):
    return {"name": name, "oof_auc": auc, "band_feasible": feasible, "latency_ms": latency, "size_mb": size}


def test_shootout_decision_follows_the_plan():
    from distrib.recipes.shootout import decide

    a, b = _row("a", 0.9, latency=30.0), _row("b", 0.8)
    assert decide([b, _row("a", 0.9)], 16.0, 0)["line"].startswith("Deploy `a`: the most accurate")
    d = decide([a, b], 16.0, 0)
    assert d["action"] == "distill" and d["model"] == "a" and "misses latency" in d["line"]
    good, slow = _row("a student", 0.85), _row("a student", 0.85, latency=20.0)
    assert "deploy the student" in decide([a, b], 16.0, 0, good)["line"]
    assert "the student misses latency too" in decide([a, b], 16.0, 0, slow)["line"]
    d = decide([_row("a", 0.9, feasible=False), b], 16.0, 0)  # the top one fails the thresholds: next that passes
    assert d["action"] == "deploy" and d["model"] == "b" and "misses thresholds" in d["line"]
    d = decide([_row("a", 0.9, feasible=False), _row("b", 0.8, size=500.0)], 16.0, 100.0)
    assert d["action"] == "none" and d["line"].startswith("All candidates fail") and "`b` misses size" in d["line"]


def _texture(rng: np.random.Generator, fake: bool, base: np.ndarray) -> np.ndarray:
    img = base + rng.normal(0, 6, base.shape)
    if fake:  # a fine checkerboard: the kind of upsampling trace the models must find
        yy, xx = np.mgrid[:32, :32]
        img += (((yy + xx) % 2) * 2 - 1)[..., None] * 18
    return np.clip(img, 0, 255).astype(np.uint8)


def _manifests(root: Path) -> dict:
    """Small labelled manifests of our own: real/fake synthetic textures, 4 images per group."""
    rng, out = np.random.default_rng(0), {}
    for split, groups in (("train", 10), ("val", 4), ("test", 4)):
        rows = []
        for g in range(groups):
            base = rng.uniform(40, 215, (1, 1, 3)) + rng.normal(0, 25, (4, 4, 3)).repeat(8, 0).repeat(8, 1)
            for i in range(4):
                fake = bool(i % 2)
                rel = f"img/{split}/g{g}_{i}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_texture(rng, fake, base)).save(root / rel, quality=95)
                rows.append({"path": rel, "label": "fake" if fake else "real", "group": f"{split}{g}"})
        out[split] = root / f"{split}.csv"
        pd.DataFrame(rows).to_csv(out[split], index=False)
    return out


def _tiny_recipe(root: Path) -> Path:
    (root / "grid.yaml").write_text("train.label_smoothing: [0.0]\n")
    debug = str(REPO / "launch" / "configs" / "experiments" / "debug.yaml")
    recipe = {
        "name": "tiny recipe",
        "data": {
            "train": "train.csv",
            "val": "val.csv",
            "test": "test.csv",
            "folds": 2,
            "shard_size": 12,
            "workers": 1,
        },
        "overrides": [
            "train.epochs=1",
            "train.max_steps=3",
            "train.latency_batches=1",
            "data.batch_size=8",
            "embed.dim=4",
            "embed.anchors=8",
            "embed.fit_samples=16",
            "tune.max_failures=0",
        ],
        "stage1": {"experiment": debug, "overrides": ["name=stage1", "model.name=test_resnet"]},
        "experts": [
            {"experiment": debug, "grid": "grid.yaml", "overrides": ["name=exp_a", "model.name=test_efficientnet"]},
            {"experiment": debug, "grid": "grid.yaml", "overrides": ["name=exp_b", "model.name=test_convnext"]},
        ],
        "stack": {"folds": 2, "n_estimators": 10, "min_child_samples": 2, "features": ["prob", "emb"]},
        "thresholds": {"bootstrap": 5},
        "cascade": {"batch_size": 16},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_missing_hub_weights_fail_before_anything_starts(tmp_path):
    """An expert with model.pretrained: true and no cached weights (offline): the hub error, nothing written."""
    _manifests(tmp_path)
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    env = {**subprocess_env(tmp_path), "HF_HOME": str(tmp_path / "empty_hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [PYTHON, "-m", "distrib", "run", str(recipe), "--out", str(out), "model.pretrained=true"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pretrained weights for 'test_resnet'" in proc.stderr and "model.pretrained_file" in proc.stderr
    assert not out.exists()


def test_a_model_that_cannot_take_its_input_size_fails_before_anything_starts(tmp_path):
    """GenConViT built for 32 px fed data.img_size 64 used to fail only when its first sweep trial started,
    minutes after stage 1; now the recipe's own check builds every model and runs one forward first."""
    from distrib.cli import main as cli_main

    _manifests(tmp_path)
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    genconvit = str(REPO / "launch" / "configs" / "experiments" / "demo_expert_genconvit.yaml")
    tree = yaml.safe_load(recipe.read_text())
    tree["experts"][1] = {"experiment": genconvit, "grid": "grid.yaml", "overrides": ["model.img_size=32"]}
    recipe.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"GenConViT was built for 32 px .* model\.img_size"):
        from distrib.recipes import run_recipe

        run_recipe(recipe, out)
    assert not out.exists()
    assert cli_main(["run", str(recipe), "--out", str(out)]) == 2 and not out.exists()


def test_an_embed_dim_larger_than_the_val_set_fails_before_anything_starts(tmp_path):
    """The alignment anchors are val images: embed.dim above their count used to fail after the expert's sweep."""
    from distrib.recipes import run_recipe

    m = _manifests(tmp_path)
    n_val = len(pd.read_csv(m["val"]))
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    with pytest.raises(DataError, match=rf"embed.dim={n_val + 1} needs .* has {n_val}; .*overrides.embed.dim="):
        run_recipe(recipe, out, [f"overrides.embed.dim={n_val + 1}"])
    assert not out.exists()


def test_too_few_groups_for_the_folds_or_the_meta_cv_fail_before_anything_starts(tmp_path):
    """Found by a new-user pass: 4 train groups under data.folds=5 failed at the shard step (naming `--folds`, a
    `distrib shard` flag), and under stack.folds=5 only after every model had trained. Both fail first now."""
    from distrib.recipes import run_recipe

    _manifests(tmp_path)  # 10 train groups
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    with pytest.raises(
        DataError, match=r"data.folds=11 but .*train.csv has 10 group\(s\).* set data.folds=10 or fewer"
    ):
        run_recipe(recipe, out, ["data.folds=11"])
    with pytest.raises(DataError, match=r"stack.folds=11: .* has 10; set stack.folds=10 or fewer"):
        run_recipe(recipe, out, ["stack.folds=11"])
    assert not out.exists()


def test_a_changed_recipe_replaces_one_whose_run_finished_no_step(tmp_path):
    """A run that failed before its first step finished trained nothing: the corrected command goes on (it used
    to be refused as a different recipe). Once a step has finished, the same change is refused."""
    from distrib.recipes.config import load_recipe as load
    from distrib.recipes.resolve import resolve
    from distrib.recipes.state import SAVED, STATE, check_saved

    _manifests(tmp_path)
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    old, new = (resolve(load(recipe, [f"data.folds={k}"]), out)["saved"] for k in (2, 3))
    check_saved(out, old, overwrite=False)
    check_saved(out, new, overwrite=False)  # nothing finished: replaced
    assert yaml.safe_load((out / SAVED).read_text()) == new
    (out / STATE).write_text(json.dumps({"shards": 1.0}))
    with pytest.raises(Exception, match=r"different recipe .*recipe data"):
        check_saved(out, old, overwrite=False)
    assert yaml.safe_load((out / SAVED).read_text()) == new


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_run_recipe_end_to_end_killed_once_and_resumed(tmp_path):
    manifests = _manifests(tmp_path)
    recipe, out = _tiny_recipe(tmp_path), tmp_path / "run"
    tree = yaml.safe_load(recipe.read_text())  # stage 1 as a 2-process gloo `accelerate launch` (DDP)
    tree["stage1"].update(
        accelerate_config=str(REPO / "accelerate_config.yaml"), accelerate_args=["--main_process_port", "29547"]
    )
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
    cmd = [PYTHON, "-m", "distrib", "run", str(recipe), "--out", str(out), "--num-cpus", "2"]
    env = {**subprocess_env(tmp_path), "ACCELERATE_USE_CPU": "true"}
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    state = out / "recipe_state.json"
    try:  # kill once stage 1 is recorded done (the sweeps are starting): a hard kill, no cleanup
        while proc.poll() is None and not (state.is_file() and "stage 1" in json.loads(state.read_text())):
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    first = proc.stdout.read()
    assert not (out / "report.md").exists() or "## Pipeline" not in (out / "report.md").read_text()

    ray_dirs = lambda: {p for p in Path("/tmp").glob("distrib-ray-*") if p.is_dir()}  # noqa: E731
    before = ray_dirs()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1400)
    wall = time.time() - t0
    assert done.returncode == 0, first[-2000:] + done.stdout[-3000:] + done.stderr[-5000:]
    assert ray_dirs() <= before  # the recipe's private Ray cluster is stopped and its temp dir removed
    forked = {json.loads(p.read_text())["fork_server"] for p in out.glob("sweep_*/trials/*/trial_result.json")}
    assert forked == {True}  # the recipe's one cluster has the trial fork server too (tune.fork_server)
    log = done.stdout + done.stderr
    assert "shards: done" in log and "stage 1: done" in log  # skipped, not redone

    results = json.loads((out / "evaluation_results.json").read_text())
    info = results["pipeline"]
    assert info["skipped"][:2] == ["shards", "stage 1"]
    assert set(info["step_seconds"]) == {
        "shards",
        "stage 1",
        "sweep exp_a",
        "sweep exp_b",
        "stack",
        "thresholds",
        "cascade",
    }
    report = (out / "report.md").read_text()
    assert info["stage1_metrics"]["auc"] is not None and re.search(r"Stage 1: val AUC [01]\.\d{4}", report)
    assert info["stage1_metrics"]["world_size"] == 2 and (out / "stage1_config.yaml").is_file()  # DDP stage 1
    n_test = len(pd.read_csv(manifests["test"]))
    assert results["n"] == n_test and 0.0 <= results["metrics"]["cascade"]["auc"] <= 1.0
    report = (out / "report.md").read_text()
    assert report.count("## Pipeline") == 1 and "| sweep exp_a |" in report and "exp_b" in report
    n_train = len(pd.read_csv(manifests["train"]))
    for name in ("exp_a", "exp_b"):
        oof = pd.read_parquet(out / f"sweep_{name}" / "oof_embeddings.parquet")
        rows = oof[oof["split"] == "oof"]
        assert len(rows) == n_train and rows["key"].is_unique  # each training sample exactly once
    meta = pd.read_parquet(out / "stack" / "meta_predictions.parquet")
    assert meta.loc[meta["split"] == "oof", "key"].is_unique and (meta["split"] == "oof").sum() == n_train
    print(f"\nrecipe end to end (killed once, resumed): {wall:.0f} s wall; steps {info['step_seconds']}\n{report}")

    changed = subprocess.run([*cmd, "data.folds=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "--overwrite" in changed.stderr and "recipe data" in changed.stderr
    assert json.loads((out / "evaluation_results.json").read_text()) == results  # nothing was touched

    # a change after training (embed.dim, a stack setting) keeps stage 1 and the sweeps: it re-embeds the
    # same best fold runs and re-runs stack -> thresholds -> cascade -> report, without --overwrite
    trained = {p: p.stat().st_mtime_ns for p in out.glob("sweep_*/trials/*/best_model.pth")}
    trained[out / "stage1" / "best_model.pth"] = (out / "stage1" / "best_model.pth").stat().st_mtime_ns
    again = subprocess.run(
        [*cmd, "overrides.embed.dim=3", "stack.n_estimators=11"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "re-embed exp_a, exp_b" in again.stderr and "finished stage 1 and sweeps are kept" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # nothing retrained
    for name in ("exp_a", "exp_b"):
        oof = pd.read_parquet(out / f"sweep_{name}" / "oof_embeddings.parquet")
        assert sum(c.startswith("emb_") for c in oof.columns) == 3 and oof["key"].is_unique
    redone = json.loads((out / "evaluation_results.json").read_text())["pipeline"]
    assert redone["skipped"] == ["shards", "stage 1"] and "stack" in redone["step_seconds"]
    assert json.loads((out / "stack" / "meta_features.json").read_text())["config"]["n_estimators"] == 11


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pit_recipe_shootout_table_and_decision_line(tmp_path):
    """launch/recipes/pit.yaml itself with tiny overrides: four candidates, the table, the student, the line."""
    m = _manifests(tmp_path)
    out = tmp_path / "pit"
    tiny = [
        f"data.train={m['train']}",
        f"data.val={m['val']}",
        f"data.test={m['test']}",
        "data.positive=fake",
        "data.folds=2",
        "data.shard_size=12",
        "data.workers=1",
        "thresholds.bootstrap=5",
        "shootout.latency_ms=0.0001",  # nobody meets it: the most accurate one gets a distilled student
        "model.name=test_resnet",
        "model.img_size=0",
        "model.pretrained=false",
        "data.img_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "train.epochs=1",
        "train.max_steps=2",
        "train.latency_batches=1",
        "embed.dim=4",
        "embed.anchors=8",
        "embed.fit_samples=16",
        "tune.max_failures=0",
    ]
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "distrib",
            "run",
            str(REPO / "launch" / "recipes" / "pit.yaml"),
            "--out",
            str(out),
            "--num-cpus",
            "2",
            *tiny,
        ],
        cwd=REPO,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((out / "evaluation_results.json").read_text())
    names = [c["name"] for c in res["candidates"]]
    assert (
        names[:4]
        == [
            "pit_baseline_resnet50",
            "pit_exp002_convnextv2_tiny",
            "pit_exp003_effnet_b2_unnormalized",
            "pit_exp006_dinov2_probe",
        ]
        and "student of" in names[4]
    )
    assert res["decision"]["action"] == "distill" and "latency" in res["decision"]["line"]
    for c in res["candidates"]:
        assert c["latency_ms"] > 0 and c["size_mb"] > 0 and 0 <= c["oof_auc"] <= 1
    report = (out / "report.md").read_text()
    assert "## Shoot-out" in report and "**Decision:**" in report and report.count("| pit_") >= 4
    print(f"\n{report}")


def test_demo_configs_flag_reads_the_recipes_own_files_from_the_other_folder(tmp_path):
    """`distrib demo --configs DIR` once named a fixed expert list, so it ran the old random-init expert after
    the recipe moved to the pretrained one: it must change where the files live, never which models run."""
    import shutil

    from distrib.cli.commands import configs_overrides

    recipe = REPO / "launch" / "recipes" / "demo.yaml"
    other = tmp_path / "configs"
    shutil.copytree(REPO / "launch" / "configs", other)
    plain, moved = load_recipe(recipe), load_recipe(recipe, configs_overrides(recipe, other))
    assert [Path(e.experiment).name for e in moved.experts] == [Path(e.experiment).name for e in plain.experts]
    assert [Path(e.grid).name for e in moved.experts] == [Path(e.grid).name for e in plain.experts]
    assert Path(moved.stage1.experiment).name == Path(plain.stage1.experiment).name
    assert all(Path(e.experiment).parent == other.resolve() / "experiments" for e in moved.experts)
    assert "demo_expert_lite0.yaml" in [Path(e.experiment).name for e in moved.experts]
