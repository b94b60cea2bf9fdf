"""Issue 27.10: ``distrib tune --address`` naming a port where nothing listens fails fast (ray.init would retry
the GCS forever), in one line that names the address, with exit 2 and no sweep folder."""

from __future__ import annotations

import socket
import subprocess
import time

from conftest import PYTHON, REPO, subprocess_env

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"


def test_tune_on_a_dead_address_fails_within_30_s_and_writes_nothing(tmp_path, demo_shards):
    with socket.socket() as closed:  # bound, never listening: a connect is refused, and no one else gets the port
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        (tmp_path / "grid.yaml").write_text("optim.lr: [1.0e-3]\n")
        sweep = tmp_path / "sweep"
        t0 = time.monotonic()
        proc = subprocess.run(
            [PYTHON, "-m", "distrib", "tune", str(DEBUG), f"data.shards={demo_shards}", "tune.embed_best=false"]
            + ["--grid", str(tmp_path / "grid.yaml"), "--out", str(sweep), "--address", address],
            cwd=REPO,
            env=subprocess_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,  # the old code never returned; fail the test, not hang it
        )
        elapsed = time.monotonic() - t0
    assert elapsed < 30, (elapsed, proc.stderr[-2000:])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and address in errors[0] and "--address" in errors[0], proc.stderr[-3000:]
    assert not sweep.exists(), sorted(p.name for p in sweep.iterdir())
    assert proc.stdout.strip() == "", proc.stdout
