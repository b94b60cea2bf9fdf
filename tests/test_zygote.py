"""The trial fork server (distrib.sweep.zygote) on its own: a real server process, a real forked training run."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from conftest import PYTHON, REPO, subprocess_env

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"


@pytest.mark.timeout(300)
def test_a_forked_trial_reports_through_the_caller_with_its_env_and_threads(demo_shards, tmp_path, monkeypatch):
    """Over a stale socket file (a server that died): the server starts anyway and says when it has imported
    (``wait_ready``, not before: the stale ready marker is gone); the child trains with the
    caller's environment and OMP_NUM_THREADS, every epoch's report runs in the caller before the child goes on,
    and its output lands in the run dir."""
    from distrib.sweep import zygote

    sock = str(tmp_path / "z.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()  # the file stays, nobody listens
    open(zygote.ready_path(sock), "w").close()  # and the dead server's ready marker
    proc = zygote.start(sock, env=subprocess_env(tmp_path))
    try:
        assert not os.path.exists(zygote.ready_path(sock))  # not ready before its imports
        assert zygote.wait_ready(sock, timeout=120) >= 0 and os.path.exists(zygote.ready_path(sock))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("DISTRIB_TEST_MARK", "from-the-actor")  # the child must see the caller's environment
        reports = []
        run_dir = tmp_path / "run"
        final, threads = zygote.run_in_child(
            sock,
            str(DEBUG),
            [
                f"data.shards={demo_shards}",
                "train.epochs=2",
                "data.samples_per_epoch=32",
                "train.latency_batches=1",
                "model.name=test_resnet",
            ],
            run_dir,
            False,
            lambda m, c=None: reports.append((m["epoch"], c, os.getpid())),
        )
        assert [r[0] for r in reports] == [1, 2] and all(r[2] == os.getpid() for r in reports)
        assert all(c and os.path.isdir(c) for _, c, _ in reports)  # the checkpoint dir Tune would ship
        assert threads == 1 and final["steps"] > 0 and 0 <= final["auc"] <= 1
        assert (run_dir / "evaluation_results.json").is_file()
        assert "training test_resnet" in (run_dir / "trial_output.log").read_text()
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.timeout(300)
def test_the_child_dies_with_its_caller(demo_shards, tmp_path):
    """A caller SIGKILLed mid-training (a lost node, a killed actor): its forked trial exits within a second."""
    import time

    import psutil

    from distrib.sweep import zygote

    sock = str(tmp_path / "z.sock")
    env = subprocess_env(tmp_path)
    proc = zygote.start(sock, env=env)
    caller = (
        "import sys; from distrib.sweep import zygote; "
        "zygote.run_in_child(sys.argv[1], sys.argv[2], sys.argv[4:], sys.argv[3], False, lambda m, c=None: None)"
    )
    run_dir = tmp_path / "run"
    actor = subprocess.Popen(
        [
            zygote.sys.executable,
            "-c",
            caller,
            sock,
            str(DEBUG),
            str(run_dir),
            f"data.shards={demo_shards}",
            "train.epochs=50",
            "model.name=test_resnet",
        ],
        cwd=REPO,
        env=env,
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "trial_output.log").exists() or "epoch" not in (run_dir / "trial_output.log").read_text():
            assert time.time() < deadline and actor.poll() is None
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children()
        assert len(children) == 1
        actor.kill()
        actor.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, "the forked trial outlived its caller"
    finally:
        actor.kill()
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.timeout(300)
def test_the_server_imports_the_trial_stack_but_not_ray(tmp_path):
    """The forked child trains and reports over the socket; the actor talks to Tune. Importing Ray in the server
    only delayed the first trials (the server imports while they queue)."""
    code = (
        "import importlib, json, sys; from distrib.sweep.zygote import PRELOAD; "
        "[importlib.import_module(m) for m in PRELOAD]; "
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
