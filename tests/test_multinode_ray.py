"""Issue 13 item 2: a 2-node Ray cluster on one host (`ray start --head` + `ray start --address`), a sweep
spread over both nodes, and a sweep that loses its worker node (raylet SIGKILLed) mid-epoch.

Real `ray start` processes (distrib.sweep.ray_nodes), the real `distrib tune` CLI with --address and
--storage, real trials on the demo shards. The cluster is stopped by PID (never `ray stop`) in a finalizer.
Tests run in file order: the node-kill test is last because it destroys the worker node.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import PYTHON, REPO, subprocess_env
from distrib.runs import find_checkpoint
from distrib.sweep.local_ray import _temp_dir, _uses_dir, listening_sockets
from distrib.sweep.ray_nodes import add_worker, kill_node, raylets, start_head, stop_cluster
from distrib.training.checkpoint import saved_state

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
# 2 epochs x 12 steps, a checkpoint every 2 steps: the worker's trial is mid-epoch for several seconds.
# The spread test runs the same trials without a kill: its Tuner.fit time is the kill's baseline.
TRIALS = [
    "train.epochs=2",
    "data.samples_per_epoch=192",
    "train.ckpt_every_steps=2",
    "train.latency_batches=1",
    "tune.max_failures=2",
    # steps slower than resnet18's at 32 px, so the kill lands mid-epoch, with 1.5 MB checkpoints, not 170 MB
    # (at 128 px a quiet machine once finished all 24 steps between the first checkpoint and the kill)
    "data.img_size=192",
]
SPREAD = [*TRIALS, "tune.embed_best=false"]
KILL = TRIALS
FIGURES: dict = {}


@pytest.fixture(scope="module")
def two_nodes(session_tmp):
    """Head (1 CPU) + one worker node (1 CPU) on 127.0.0.1, both from `ray start`; stopped by PID."""
    temp_dir = _temp_dir()
    cluster = {"temp_dir": temp_dir}
    env = subprocess_env(session_tmp)
    try:
        cluster = start_head(None, 1, temp_dir=temp_dir, env=env, log=session_tmp / "ray_2nodes.log")
        worker = add_worker(cluster, 1, env=env)
        yield {**cluster, "worker": worker, "env": env}
    finally:
        stopped = stop_cluster(cluster)
        print("stopped by PID:", stopped)
        assert not any(_uses_dir(p, temp_dir) for p in psutil.process_iter()), "a Ray process outlived the cluster"


def test_bench_sweep_ideal_is_ceil_rounds_of_the_median_trial():
    from distrib.bench.sweep import ideal_seconds

    assert ideal_seconds([4.0, 5.0, 3.0, 4.0, 6.0], 2) == 12.0  # ceil(5/2) = 3 rounds x 4 s, not 5/2 x 4.4
    assert ideal_seconds([4.0, 4.0], 2) == 4.0 and ideal_seconds([2.0, 3.0, 4.0], 1) == 9.0


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _tune(cluster: dict, shards: Path, tmp: Path, out: Path, overrides: list[str]) -> subprocess.Popen:
    (tmp / "grid.yaml").write_text("optim.lr: [1.0e-3]\n")
    cmd = [
        PYTHON,
        "-m",
        "distrib",
        "tune",
        str(DEBUG),
        f"data.shards={shards}",
        *overrides,
        "--grid",
        str(tmp / "grid.yaml"),
        "--out",
        str(out),
        "--address",
        cluster["address"],
        "--storage",
        str(tmp / "shared" / "ray"),
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _events(run_dir: Path) -> list[list[str]]:
    return [line.split()[2:] for line in (run_dir / "trial_events.log").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_node_cluster_is_loopback_only_including_the_ray_client_server(two_nodes):
    procs = [p for p in psutil.process_iter() if _uses_dir(p, two_nodes["temp_dir"])]
    listeners = listening_sockets(procs)
    print("2-node Ray listeners:", sorted(set(listeners)))
    assert {n for n, _, _ in listeners} >= {"gcs_server", "raylet"}, listeners
    assert len(raylets(two_nodes["temp_dir"])) == 2
    client = [p for p in procs if "ray.util.client.server" in " ".join(p.cmdline())]
    assert client and listening_sockets(client), "the head's Ray client server should run (on loopback)"
    assert all(_is_loopback(ip) for _, ip, _ in listeners), [x for x in listeners if not _is_loopback(x[1])]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_spreads_trials_over_both_nodes_and_records_the_node(two_nodes, demo_shards, tmp_path):
    t0 = time.time()
    result = _finish(_tune(two_nodes, demo_shards, tmp_path, tmp_path / "sweep", SPREAD), 480)
    FIGURES["spread_wall_s"], FIGURES["spread_fit_s"] = time.time() - t0, result["fit_s"]
    summary = pd.read_csv(tmp_path / "sweep" / "sweep_summary.csv")
    print(summary[["config_id", "fold", "node_id", "node_ip", "hostname", "seconds"]].to_string())
    assert result["status"] == "done" and (summary["status"] == "done").all(), summary
    head, worker = two_nodes["node_id"], two_nodes["worker"]["node_id"]
    assert set(summary["node_id"]) == {head, worker}, summary["node_id"]  # 3 trials on 2 one-CPU nodes
    assert (summary["node_ip"] == "127.0.0.1").all() and summary["hostname"].notna().all()
    assert (summary["attempts"] == 1).all() and summary["resume_step"].isna().all()
    # each node was started with its own trial fork server (ray_nodes, sweep.zygote): every trial ran forked
    # from it, with its 1 CPU's torch threads
    trials = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep" / "trials").glob("*/trial_result.json"))]
    print("trial startup_seconds:", [round(t["startup_seconds"], 2) for t in trials])
    assert [(t["fork_server"], t["torch_threads"]) for t in trials] == [(True, 1)] * 3, trials


def _worker_trial(
    sweep: Path, worker_node: str, proc: subprocess.Popen, timeout: float, min_step: int = 4
) -> tuple[Path, int]:
    """The run dir of a trial running on the worker node, once it has a mid-epoch checkpoint at a step
    >= ``min_step`` (and that step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        for run_dir in sorted((sweep / "trials").glob("*_fold*")):
            ev = _events(run_dir) if (run_dir / "trial_events.log").is_file() else []
            ckpt = find_checkpoint(run_dir)
            if ev and ev[0] == ["start", worker_node] and ckpt is not None:
                try:
                    state = saved_state(ckpt)
                except Exception:  # written right now
                    continue
                if state["step"] >= min_step and not state["done"] and state["pos"] > 0:
                    return run_dir, int(state["step"])
        time.sleep(0.1)
    pytest.fail(f"no trial reached a mid-epoch checkpoint on the worker node within {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_losing_the_worker_node_mid_epoch_resumes_its_trial_from_shared_checkpoint(two_nodes, demo_shards, tmp_path):
    """SIGKILL the worker's raylet while its trial is mid-epoch: the sweep completes on the head, the lost
    trial resumes from the last checkpoint in its run dir (SWEEP_DIR, shared by both nodes; Tune keeps no copy
    of it with tune.ship_checkpoints off, the default), not from scratch,
    and every fold is in sweep_summary.csv and the OOF table exactly once."""
    sweep = tmp_path / "sweep"
    worker = two_nodes["worker"]
    t0 = time.time()
    proc = _tune(two_nodes, demo_shards, tmp_path, sweep, KILL)
    try:
        lost, ckpt_step = _worker_trial(sweep, worker["node_id"], proc, 300)
        t_kill = kill_node(worker["raylet_pid"])
        ckpt = find_checkpoint(lost)
        ckpt_mtime, step_at_kill = (ckpt / "trainer_state.pt").stat().st_mtime, int(saved_state(ckpt)["step"])
        result = _finish(proc, 600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    wall = time.time() - t0
    summary = pd.read_csv(sweep / "sweep_summary.csv")
    print(summary[["config_id", "fold", "node_id", "attempts", "resume_step", "epochs", "seconds"]].to_string())
    assert result["status"] == "done" and result["errors"] == [], result

    # exactly once: one row per (config, fold), all done, now all on the head
    assert sorted(zip(summary.config_id, summary.fold)) == [("c0", 0), ("c0", 1), ("c0", 2)]
    assert (summary["status"] == "done").all() and (summary["epochs"] == 2).all(), summary
    oof = pd.read_parquet(sweep / "oof_embeddings.parquet")
    rows = oof[oof["split"] == "oof"]
    assert sorted(rows["fold"].unique()) == [0, 1, 2] and not rows["key"].duplicated().any()

    # the lost trial: 2 attempts, the second on the head, resumed at the checkpoint the first one left
    name = lost.name
    row = summary[summary.trial_dir == str(lost)].iloc[0]
    ev = _events(lost)
    starts = [e[1] for e in ev if e[0] == "start"]
    assert starts[0] == worker["node_id"] and starts[-1] == two_nodes["node_id"], ev
    resumes = [int(e[1]) for e in ev if e[0] == "resume"]
    # the killed raylet's trial process notices within seconds; on an idle machine it may checkpoint a few more
    # steps first, so the retry resumes from the newest checkpoint in the run dir: at or after the one at the kill
    assert row.attempts == 2 and len(resumes) == 1 and resumes[0] >= step_at_kill >= ckpt_step > 0, (ev, step_at_kill)
    assert row.resume_step == resumes[0]
    # tune.ship_checkpoints is off by default: Ray's storage holds no copy, the retry read the shared run dir
    assert not list((tmp_path / "shared" / "ray").rglob("checkpoint_*")), "Tune copied checkpoints unasked"
    res = json.loads((lost / "trial_result.json").read_text())
    total_steps = int(res["metrics"]["steps"])
    log = pd.read_csv(lost / "training_log.csv")
    assert list(log["epoch"]) == [1, 2] and int(log["step"].iloc[-1]) == total_steps  # no duplicate rows
    others = summary[summary.trial_dir != str(lost)]
    assert (others["attempts"] == 1).all(), others

    t_retry = float(
        next(
            line.split()[0]
            for line in (lost / "trial_events.log").read_text().splitlines()[1:]
            if line.split()[2] == "start"
        )
    )
    step_s = res["seconds"] / max(total_steps - resumes[0], 1)
    figures = {
        "trial": name,
        "resume_step": resumes[0],
        "steps": total_steps,
        # ckpt_every_steps=2 and no newer checkpoint at the kill: at most 1 step was lost and redone
        "steps_redone_max": 1,
        "steps_redone_est": round((t_kill - ckpt_mtime) / step_s, 1),
        "checkpoint_step_at_kill": step_at_kill,
        "steps_saved_vs_scratch": resumes[0],
        "work_lost_s": round(t_kill - ckpt_mtime, 1),
        "retry_started_after_kill_s": round(t_retry - t_kill, 1),
        "retry_startup_s": round(res["startup_seconds"], 1),
        "sweep_wall_s": round(wall, 1),
        "fit_s": round(result["fit_s"], 1),
        "fit_s_same_sweep_no_kill": FIGURES.get("spread_fit_s"),
        "wall_time_cost_s": round(result["fit_s"] - FIGURES["spread_fit_s"], 1) if FIGURES else None,
    }
    print("node-loss figures:", json.dumps(figures))
