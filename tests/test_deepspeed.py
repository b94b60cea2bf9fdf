"""DeepSpeed ZeRO-2 on 2 CPU processes (gloo), selected only by launch/deepspeed_zero2.yaml."""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest
import torch

from conftest import REPO, subprocess_env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deepspeed_zero2_two_cpu_processes(demo_shards, tmp_path):
    out = tmp_path / "run"
    env = subprocess_env(tmp_path)  # JIT-built DeepSpeed ops are cached under tmp (TORCH_EXTENSIONS_DIR)
    env["DS_ACCELERATOR"] = "cpu"
    env.pop("ACCELERATE_USE_CPU", None)  # it would make accelerate run plain MULTI_CPU instead of DeepSpeed
    cmd = [
        str(REPO / ".venv" / "bin" / "accelerate"),
        "launch",
        "--config_file",
        "launch/deepspeed_zero2.yaml",
        "--main_process_port",
        "29541",
        "launch/train.py",
        "launch/configs/experiments/debug.yaml",
        "--out",
        str(out),
        f"data.shards={demo_shards}",
        "train.epochs=1",
        "train.ckpt_every_steps=2",
        "model.name=test_efficientnet",  # tiny, and not debug.yaml's model: load_run must restore it
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]

    finals = dict(re.findall(r"\[rank (\d)\] final (\{.*\})", proc.stdout))
    assert set(finals) == {"0", "1"}
    ranks = {r: ast.literal_eval(v) for r, v in finals.items()}
    # equal weights AND buffers: BatchNorm running stats are synced from rank 0 before evaluating
    assert ranks["0"]["param_checksum"] == ranks["1"]["param_checksum"]
    results = json.loads((out / "evaluation_results.json").read_text())
    assert results["world_size"] == 2 and results["distributed_type"] == "DEEPSPEED"
    assert results["backend"] == "gloo"
    # the engine wrote its partitioned checkpoint; best_model.pth holds full, plain weights
    assert (out / "last_checkpoint" / "deepspeed").is_dir()
    assert torch.load(out / "last_checkpoint" / "trainer_state.pt", weights_only=True)["epoch"] == 1
    best = torch.load(out / "best_model.pth", weights_only=True)
    from distrib.runs import load_run

    model, cfg, metrics = load_run(out)
    assert metrics == best["metrics"] and cfg.model.name == "test_efficientnet"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1)
