"""Shared fixtures: one tiny real demo dataset and its shards per test session; temp dirs in tmp."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("session")
    # Keep temporaries, JIT-built ops and Ray state inside the test's tmp dir.
    os.environ["TMPDIR"] = str(root)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("MPLBACKEND", "Agg")
    return root


@pytest.fixture(scope="session")
def demo_data(session_tmp) -> Path:
    from distrib.demo.data import build_demo_dataset

    out = session_tmp / "demo_data"
    build_demo_dataset(out, size="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_data, session_tmp) -> Path:
    from distrib.data.shards import write_shards

    out = session_tmp / "demo_shards"
    write_shards(
        demo_data / "train_manifest.csv",
        out,
        val=demo_data / "val_manifest.csv",
        test=demo_data / "test_manifest.csv",
        folds=3,
        seed=0,
        shard_size=30,
        workers=1,
        names="negative=real,positive=fake",  # the demo's task: label 1 = manipulated
    )
    return out


@pytest.fixture(scope="session")
def fold_runs(demo_shards, session_tmp) -> list[str]:
    """Three debug-config fold runs on the demo shards (one per fold), trained once for every test that
    reads finished fold runs (OOF extraction, the cascade, predict)."""
    from distrib.config import load_config
    from distrib.training.trainer import run

    debug = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
    runs = []
    for k in range(3):
        cfg = load_config(
            debug,
            [
                f"data.shards={demo_shards}",
                f"data.fold={k}",
                "train.epochs=1",
                "data.samples_per_epoch=32",
                "train.latency_batches=1",
                "embed.dim=8",
                "embed.anchors=24",
                "embed.fit_samples=64",
            ],
        )
        run(cfg, session_tmp / "fold_runs" / f"fold{k}")
        runs.append(str(session_tmp / "fold_runs" / f"fold{k}"))
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(session_tmp):
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs, shared by the sweep tests (test_tune, test_search);
    stopped by signalling the process we started."""
    base = session_tmp if len(str(session_tmp)) <= 28 else Path(tempfile.mkdtemp(prefix="dray", dir="/tmp"))
    temp_dir = tempfile.mkdtemp(prefix="r", dir=base)  # Ray socket paths must stay short
    port = _free_port()
    env = subprocess_env(session_tmp)
    env["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps 127.0.0.1 (else the client server binds the host IP)
    log = open(session_tmp / "ray_head.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(PYTHON).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "false",
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            "--ray-client-server-port",
            str(_free_port()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (session_tmp / "ray_head.log").read_text()[-3000:]
        if "Ray runtime started" in (session_tmp / "ray_head.log").read_text():
            break
        time.sleep(1)
    else:
        pytest.fail("ray start --head did not come up in 120 s")
    yield address
    proc.send_signal(signal.SIGINT)  # --block: the head kills the processes it started, then exits (~3 s)
    try:
        proc.wait(timeout=15)  # a head that hangs here once cost the suite 60 s; SIGKILL its session instead
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started for it, by its id
        proc.wait(timeout=30)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """An 8 MiB tmpfs the test mounts, for full-disk cases; skipped with the reason where mounting fails."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the full-disk test needs one")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def subprocess_env(tmp: Path) -> dict:
    """Environment for child processes: repo on the path, temp files and JIT caches under tmp."""
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tmp / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    env["RAY_AUTH_MODE"] = "disabled"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


PYTHON = sys.executable


# Unit or integration, decided once here so no test file has to say it. A test is `integration` when it
# runs something real beyond one process's Python: it carries one of the markers below, asks for a
# session fixture that builds shards, trained runs or a Ray cluster, or its body (or a module-level helper
# it calls, two levels deep) starts a subprocess. Everything else is `unit` (`make test-fast`).
_INTEGRATION_MARKERS = {"slow", "multiproc", "ray", "gpu"}
_INTEGRATION_FIXTURES = {"demo_data", "demo_shards", "fold_runs", "ray_cluster"}
_SPAWNS = ("subprocess", "Popen", "spawn_", "mp.Process", "multiprocessing")


def _spawns(func, module, depth: int = 2) -> bool:
    import inspect

    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if any(s in source for s in _SPAWNS):
        return True
    if depth == 0:
        return False
    names = func.__code__.co_names if hasattr(func, "__code__") else ()
    return any(
        _spawns(helper, module, depth - 1)
        for name in names
        if inspect.isfunction(helper := getattr(module, name, None)) and helper.__module__ == module.__name__
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        fixtures = set(getattr(item, "fixturenames", ()))
        func = getattr(item, "function", None)
        integration = (
            marks & _INTEGRATION_MARKERS
            or fixtures & _INTEGRATION_FIXTURES
            or (func is not None and _spawns(func, item.module))
        )
        item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)
