"""DDP: a real 2-process gloo `accelerate launch launch/train.py` run over real tar shards."""

from __future__ import annotations

import ast
import csv
import json
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, subprocess_env


@pytest.fixture(scope="module")
def learnable_shards(tmp_path_factory):
    """Shards of a trivially learnable task (dark = real, bright = fake) so the loss must fall."""
    from distrib.data.shards import write_shards

    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(160):
        label = i % 2
        base = 200 if label else 55
        img = np.clip(rng.normal(base, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        path = root / "img" / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(path)
        rows.append({"path": str(path), "label": label, "group": f"g{i // 8}"})
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    write_shards(root / "train.csv", root / "shards", folds=2, seed=0, shard_size=20, workers=1)
    return root / "shards"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_two_processes_gloo(learnable_shards, tmp_path):
    out = tmp_path / "run"
    env = subprocess_env(tmp_path)
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        str(REPO / ".venv" / "bin" / "accelerate"),
        "launch",
        "--config_file",
        "accelerate_config.yaml",
        "--main_process_port",
        "29533",
        "launch/train.py",
        "launch/configs/experiments/debug.yaml",
        "--out",
        str(out),
        f"data.shards={learnable_shards}",
        "train.epochs=3",
        "optim.lr=3e-3",
        "data.batch_size=8",
        "train.log_every_steps=1",
        "model.name=resnet10t",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]

    finals = dict(re.findall(r"\[rank (\d)\] final (\{.*\})", proc.stdout))
    assert set(finals) == {"0", "1"}, proc.stdout[-2000:]
    ranks = {r: ast.literal_eval(v) for r, v in finals.items()}  # a printed dict of str/int
    assert all(v["world_size"] == 2 and v["backend"] == "gloo" for v in ranks.values())
    assert ranks["0"]["param_checksum"] == ranks["1"]["param_checksum"]  # DDP kept the replicas equal

    results = json.loads((out / "evaluation_results.json").read_text())
    assert results["world_size"] == 2 and results["distributed_type"] == "MULTI_CPU"
    assert results["backend"] == "gloo" and results["device_type"] == "cpu"
    # every validation sample exactly once across ranks (padding dropped)
    keys = [r["key"] for r in csv.DictReader(open(out / "val_predictions.csv"))]
    assert len(keys) == len(set(keys)) == results["num_val_samples"]
    index = json.loads((learnable_shards / "index.json").read_text())
    assert len(keys) == sum(s["count"] for s in index["shards"] if s["split"] == "train" and s["fold"] == 0)

    log = list(csv.DictReader(open(out / "training_log.csv")))
    losses = [float(r["train_loss"]) for r in log]
    assert losses[-1] < 0.6 * losses[0], losses  # learnable task: the loss falls
    assert results["metrics_at_0.5"]["auc"] > 0.9
    # the main process printed the result once, not once per rank
    assert proc.stdout.count('"param_checksum"') == 1
