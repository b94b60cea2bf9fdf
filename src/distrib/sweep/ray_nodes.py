"""A multi-node Ray cluster on one host: ``ray start --head`` plus worker raylets, found and stopped by PID.

Used by the multi-node tests and ``distrib bench sweep --nodes 2``; on a real cluster run the same
``ray start`` commands on each machine (docs/sweeps.md, on a cluster).

- **Loopback.** On Linux ``ray start`` turns ``--node-ip-address 127.0.0.1`` into the host's routable IP
  (``services.resolve_ip_for_localhost``), so gcs_server, raylets and the Ray client server (port 10001)
  would listen on it. The head runs with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's own switch, which
  keeps the node IP at 127.0.0.1); a worker cannot (``ray start --address`` refuses to join with it), so
  it runs ``ray start`` with that one resolver made the identity: 127.0.0.1 stays 127.0.0.1.
- **Never ``ray stop``**: it stops every Ray on the host. ``stop_cluster`` stops the processes that
  name this cluster's temp dir (every node's processes do: workers share the head's session dir).
- **Node loss.** ``kill_node`` SIGKILLs a node's raylet (its workers and agents die with it); the
  head's GCS declares the node dead after ``HEALTH_ENV`` (about 3 s instead of Ray's 15 s default).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from distrib.errors import DistribError
from distrib.sweep import zygote
from distrib.sweep.local_ray import _temp_dir, _uses_dir, terminate

HEALTH_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_initial_delay_ms": "1000",
}
BASE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
# `ray start` for a worker node with 127.0.0.1 kept as its node IP (see the module docstring); a Ray private
# (docs/DESIGN.md, library internals; tests/test_internals.py)
_WORKER_START = (
    "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; "
    "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"
)


def _ray_start(args: list[str], env: dict, log: Path, timeout: float, worker: bool) -> None:
    cmd = (
        [sys.executable, "-c", _WORKER_START, "start", *args]
        if worker
        else [str(Path(sys.executable).parent / "ray"), "start", *args]
    )
    with open(log, "a") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0:
        raise DistribError(f"`ray start {' '.join(args)}` failed (exit {rc}); see {log}")


def raylets(temp_dir: str) -> dict[str, dict]:
    """{raylet socket name: {pid, node_id}} of this cluster's live raylets (read from their command lines)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.info["name"] != "raylet":
            continue
        args = dict(a[2:].split("=", 1) for a in p.info["cmdline"] or [] if a.startswith("--") and "=" in a)
        if args.get("raylet_socket_name", "").startswith(temp_dir):
            out[args["raylet_socket_name"]] = {"pid": p.info["pid"], "node_id": args.get("node_id")}
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_fork_server(env: dict, temp_dir: str, fork_server: bool) -> tuple[dict, str | None]:
    """``env`` plus this node's own trial fork server (``sweep.zygote``), started now, when ``fork_server``;
    and that server's socket (None without one)."""
    if not fork_server:
        return env, None
    Path(temp_dir).mkdir(parents=True, exist_ok=True)  # `ray start` would create it, but only after this
    sock = zygote.socket_path(temp_dir, f"zygote-{uuid.uuid4().hex[:8]}")
    zygote.start(sock, env=env)
    return {**env, zygote.ENV: sock}, sock


def start_head(
    port: int | None,
    num_cpus: int,
    temp_dir: str | None = None,
    env: dict | None = None,
    log: Path | None = None,
    timeout: float = 180,
    fork_server: bool = True,
) -> dict:
    """``ray start --head`` on 127.0.0.1:``port`` (None: a free one); returns {address, temp_dir, raylet_pid,
    node_id, log, fork_server (its socket, or None)}. The Ray client server gets a free port too (Ray's default
    10001 clashes between heads).
    ``fork_server``: the node's trials fork from a process that has imported the trial stack (``sweep.zygote``)."""
    port = port or free_port()
    temp_dir = temp_dir or _temp_dir()
    log = Path(log or f"{temp_dir}.log")
    env = {**os.environ, **BASE_ENV, **HEALTH_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    env, server = _with_fork_server(env, temp_dir, fork_server)
    _ray_start(
        [
            "--head",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            "0",
            "--include-dashboard",
            "false",
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            "--ray-client-server-port",
            str(free_port()),
        ],
        env,
        log,
        timeout,
        worker=False,
    )
    head = next(iter(raylets(temp_dir).values()), {})
    return {
        "address": f"127.0.0.1:{port}",
        "temp_dir": temp_dir,
        "log": str(log),
        "raylet_pid": head.get("pid"),
        "node_id": head.get("node_id"),
        "fork_server": server,
    }


def add_worker(
    cluster: dict, num_cpus: int, env: dict | None = None, timeout: float = 180, fork_server: bool = True
) -> dict:
    """Join a worker node (its own raylet, ``num_cpus`` CPUs) to ``cluster``; returns {raylet_pid, node_id,
    socket, fork_server}.
    ``fork_server`` as in ``start_head`` (each node has its own)."""
    before = raylets(cluster["temp_dir"])
    env, server = _with_fork_server({**os.environ, **BASE_ENV, **(env or {})}, cluster["temp_dir"], fork_server)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # `ray start --address` refuses to join with it
    _ray_start(
        [
            "--address",
            cluster["address"],
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            "0",
            "--disable-usage-stats",
        ],
        env,
        Path(cluster["log"]),
        timeout,
        worker=True,
    )
    new = {s: p for s, p in raylets(cluster["temp_dir"]).items() if s not in before}
    if len(new) != 1:
        raise DistribError(f"added a worker node but found {len(new)} new raylets under {cluster['temp_dir']}")
    ((sock, node),) = new.items()
    return {"raylet_pid": node["pid"], "node_id": node["node_id"], "socket": sock, "fork_server": server}


def kill_node(raylet_pid: int) -> float:
    """SIGKILL a node's raylet (its workers and agents die with it); returns the time of the kill."""
    os.kill(raylet_pid, signal.SIGKILL)
    return time.time()


def stop_cluster(cluster: dict, grace_s: float = 10.0) -> list[str]:
    """Stop every process of this cluster (by PID: those naming its temp dir); never ``ray stop``."""
    import shutil

    import psutil

    temp_dir = cluster["temp_dir"]
    procs = [p for p in psutil.process_iter() if p.pid != os.getpid() and _uses_dir(p, temp_dir)]
    stopped = terminate(procs, grace_s)
    shutil.rmtree(temp_dir, ignore_errors=True)
    Path(f"{temp_dir}.log").unlink(missing_ok=True)  # start_head's default log (a chosen log is kept)
    return stopped


__all__ = ["HEALTH_ENV", "free_port", "start_head", "add_worker", "raylets", "kill_node", "stop_cluster"]
