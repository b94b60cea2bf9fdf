"""A real 2-process gloo run (accelerate launch, CPU): equal train batch counts on uneven shards, exactly-once eval."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, subprocess_env
from loader_shards import write_tiny_shards

LAYOUT = [
    ("train", 0, 41),
    ("train", 0, 2),
    ("train", 1, 13),
    ("train", 1, 6),
    ("val", -1, 11),
    ("val", -1, 3),
    ("val", -1, 7),
    ("val", -1, 1),
]


# one val shard for 2 ranks x 1 worker: eval splits it by sample index (no re-sharding needed)
ONE_VAL = [*LAYOUT[:4], ("val", -1, 22)]


@pytest.mark.multiproc
@pytest.mark.timeout(420)
@pytest.mark.parametrize("layout", [LAYOUT, ONE_VAL], ids=["four_val_shards", "one_val_shard"])
def test_two_gloo_ranks_get_equal_batches_on_uneven_shards(tmp_path, layout):
    shards = tmp_path / "shards"
    write_tiny_shards(shards, layout, size=32)
    out = tmp_path / "ddp_result.json"
    env = subprocess_env(tmp_path)
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        PYTHON,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(REPO / "tests" / "scripts" / "loader_ddp_check.py"),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo" and res["distributed_type"].endswith("MULTI_CPU")
    (steps0, len0), (steps1, len1) = res["train_batches"]
    assert steps0 == len0 == steps1 == len1 == 8  # ceil(62 samples / (2 ranks * 4))
    assert res["train_batches_sum"] == 16
    want = {f"vals{i}i{j}" for i, (s, _, n) in enumerate(layout) for j in range(n) if s == "val"}
    assert sorted(res["eval_keys"]) == sorted(want)  # every val sample once across both ranks
    assert [r["eval"]["batches"] for r in res["reports"]] == [res["reports"][0]["eval"]["batches"]] * 2
