"""Issue 27 'Done when': every subcommand's bad input exits 2 with one clear line and no traceback.

Each row is a real `distrib` subprocess; the inputs are tiny files made here, plus the suite's shared
demo shards and fold runs where a real run is needed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, subprocess_env

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_shards, fold_runs) -> dict:
    """Paths the cases refer to by name: a real run, shards, and small bad files."""
    t = tmp_path_factory.mktemp("bad_input_all")
    (t / "not_json.json").write_text("this is { not json")
    (t / "a_file").write_text("x")
    (t / "a_dir").mkdir()
    (t / "train.csv").write_text("path,label\nnope.jpg,0\n")
    (t / "pred.csv").write_text("label,prob,split\n0,0.1,val\n1,0.9,val\n")
    (t / "oof.parquet").write_bytes(b"not parquet")
    run = t / "run"
    shutil.copytree(fold_runs[0], run)
    bad = t / "bad_run"  # a truncated best_model.pth
    shutil.copytree(fold_runs[0], bad)
    data = (bad / "best_model.pth").read_bytes()
    (bad / "best_model.pth").write_bytes(data[: len(data) // 3])
    resume = t / "resume_run"  # a crafted trainer_state.pt
    shutil.copytree(fold_runs[0], resume)
    (resume / "last_checkpoint").mkdir(exist_ok=True)
    (resume / "last_checkpoint" / "trainer_state.pt").write_bytes(b"\x80\x04crafted")
    return {"t": t, "run": run, "bad": bad, "resume": resume, "shards": demo_shards, "img": Path(fold_runs[0])}


CASES = {
    "predict --thresholds not JSON": "predict --model {run} --images {shards} --out {t}/p.csv --thresholds {t}/not_json.json",
    "predict --out existing dir": "predict --model {run} --images {shards} --out {t}/a_dir",
    "predict --out under a file": "predict --model {run} --images {shards} --out {t}/a_file/p.csv",
    "predict --out onto best_model.pth": "predict --model {run} --images {shards} --out {run}/best_model.pth",
    "predict truncated best_model.pth": "predict --model {bad} --images {shards} --out {t}/p2.csv",
    "export --out existing dir": "export {run} --out {t}/a_dir",
    "export --out under a file": "export {run} --out {t}/a_file/m.onnx",
    "export --out onto best_model.pth": "export {run} --out {run}/best_model.pth",
    "train --resume crafted trainer_state.pt": f"train {DEBUG} --out {{resume}} --resume data.shards={{shards}}",
    "train --out inside the shards": f"train {DEBUG} --out {{shards}}/run data.shards={{shards}}",
    "tune --out is a file": f"tune {DEBUG} --out {{t}}/a_file data.shards={{shards}}",
    "shard --out onto its manifest": "shard --train {t}/train.csv --out {t}/train.csv",
    "embed --out existing dir": "embed --runs {run} --out {t}/a_dir",
    "embed --out inside a run it reads": "embed --runs {run} --out {run}/oof.parquet",
    "stack --out onto its input": "stack --oof {t}/oof.parquet --out {t}/oof.parquet",
    "thresholds --out onto --pred": "thresholds --pred {t}/pred.csv --out {t}/pred.csv",
    "cascade --out is a file": "cascade --config {t}/a_file --out {t}/a_file",
    "run --out onto the recipe": f"run {REPO}/launch/recipes/demo.yaml --out {REPO}/launch/recipes/demo.yaml",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_without_traceback(world, case):
    args = CASES[case].format(**{k: str(v) for k, v in world.items()}).split()
    r = subprocess.run(
        [PYTHON, "-m", "distrib", *args],
        cwd=REPO,
        env=subprocess_env(world["t"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, f"{case}: exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and len(lines[0]) > 40, r.stderr[-3000:]
    assert (world["run"] / "best_model.pth").stat().st_size > 1000  # nothing clobbered the run
