"""Multi-node DDP on one host: two real `accelerate launch` "machines" (static rendezvous, gloo).

Each launcher is what one node of a cluster runs: `--num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1`. Rank 0's torchrun agent hosts the TCPStore; rank 1 connects to it.
Every launcher is wrapped in an outer timeout: a static rendezvous has no heartbeat.
"""

from __future__ import annotations

import ast
import csv
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
RDZV_TIMEOUT_S = 60  # --rdzv_conf timeout: how long a node waits for the main node's store (loaded box)
MISSING_TIMEOUT_S = 15  # the same knob in the missing-main-node test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_args(num_processes: int, machine_rank: int, port: int, rdzv_timeout_s: int) -> list[str]:
    return [
        "--multi_gpu",
        "--num_machines",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--num_processes",
        str(num_processes),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--rdzv_conf",
        f"timeout={rdzv_timeout_s}",
    ]


def _start(
    tmp: Path,
    num_processes: int,
    machine_rank: int,
    port: int,
    shards: Path,
    out: Path,
    extra: list[str],
    rdzv_timeout_s: int = RDZV_TIMEOUT_S,
) -> tuple[subprocess.Popen, Path]:
    env = subprocess_env(tmp)
    env["ACCELERATE_USE_CPU"] = "true"
    log = tmp / f"machine{machine_rank}.log"
    cmd = [
        ACCELERATE,
        "launch",
        *_launch_args(num_processes, machine_rank, port, rdzv_timeout_s),
        "launch/train.py",
        "launch/configs/experiments/debug.yaml",
        "--out",
        str(out),
        f"data.shards={shards}",
        "train.log_every_steps=1",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log


def _wait(proc: subprocess.Popen, deadline: float) -> int:
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def _finals(*logs: Path) -> dict[int, dict]:
    found = {}
    for log in logs:
        for rank, value in re.findall(r"\[rank (\d+)\] final (\{.*\})", log.read_text()):
            found[int(rank)] = ast.literal_eval(value)
    return found


def _run_two_machines(
    tmp: Path, shards: Path, num_processes: int, delay_main_s: float, extra: list[str]
) -> tuple[dict[int, dict], Path, float]:
    """Start machine 1, then machine 0 `delay_main_s` later; return per-rank finals, run dir, wall."""
    port, out = _free_port(), tmp / "run"
    t0 = time.monotonic()
    deadline = t0 + 400
    p1, log1 = _start(tmp, num_processes, 1, port, shards, out, extra)
    time.sleep(delay_main_s)
    p0, log0 = _start(tmp, num_processes, 0, port, shards, out, extra)
    rc0, rc1 = _wait(p0, deadline), _wait(p1, deadline)
    assert (rc0, rc1) == (0, 0), f"rc0={rc0} rc1={rc1}\n{log0.read_text()[-3000:]}\n{log1.read_text()[-3000:]}"
    return _finals(log0, log1), out, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(480)
def test_two_machines_main_node_starts_10s_late(demo_shards, tmp_path):
    """Machine 1 first, the main node 10 s later: the run completes, DDP-synchronised, loss falling."""
    finals, out, _ = _run_two_machines(tmp_path, demo_shards, 2, 10.0, ["train.epochs=3", "optim.lr=3e-3"])
    assert set(finals) == {0, 1}
    assert all(v["world_size"] == 2 and v["backend"] == "gloo" for v in finals.values())
    assert finals[0]["param_checksum"] == finals[1]["param_checksum"]  # DDP kept the replicas equal
    assert finals[0]["steps"] == finals[1]["steps"] > 0
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(out / "training_log.csv"))]
    assert len(losses) == 3 and losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(480)
def test_two_machines_two_processes_each(demo_data, tmp_path):
    """--num_processes 4 over 2 machines: 2 local ranks per machine, one world of 4."""
    from distrib.data.shards import write_shards

    shards = tmp_path / "shards"  # small shards: every split needs >= one shard per rank
    write_shards(demo_data / "train_manifest.csv", shards, folds=3, seed=0, shard_size=8, workers=1)
    finals, _, _ = _run_two_machines(tmp_path, shards, 4, 0.0, ["train.epochs=1", "train.max_steps=3"])
    assert set(finals) == {0, 1, 2, 3}
    assert {v["world_size"] for v in finals.values()} == {4}
    assert len({v["param_checksum"] for v in finals.values()}) == 1
    assert {v["steps"] for v in finals.values()} == {3}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_missing_main_node_fails_within_rdzv_timeout(demo_shards, tmp_path):
    """Only machine 1 starts: it fails with torch's DistNetworkError inside ~2x the rdzv timeout."""
    t0 = time.monotonic()
    proc, log = _start(
        tmp_path,
        2,
        1,
        _free_port(),
        demo_shards,
        tmp_path / "run",
        ["train.epochs=1"],
        rdzv_timeout_s=MISSING_TIMEOUT_S,
    )
    rc = _wait(proc, t0 + 240)  # the outer guard; without --rdzv_conf timeout this hangs for 10-20 min
    wall = time.monotonic() - t0
    text = log.read_text()
    assert rc not in (0, -9), f"rc={rc} after {wall:.0f}s\n{text[-3000:]}"
    assert "DistNetworkError" in text and "127.0.0.1" in text, text[-3000:]
    assert not (tmp_path / "run" / "evaluation_results.json").exists()
