"""A fork server per node: trial processes forked from one that already imported the trial stack.

    python -m distrib.sweep.zygote SOCKET      # then start the node's raylet with DISTRIB_ZYGOTE=SOCKET

Why. A fresh Python process spends seconds importing torch, sklearn (scipy), timm (torchvision.ops
imports torch._dynamo) and kornia before a trial's first step. Tune reuses a trial's actor, so each slot pays
this once, but for 3-5 s trials that first round dominates a sweep. Ray cannot do it for us: a raylet's
prestarted workers that preload modules (``preload_python_modules``) are taken by Tune's placement-group
``ready()`` tasks, and Ray never gives an actor a worker that ran a task (docs/performance-notes.md).

How. The zygote binds ``SOCKET`` at once (so a trial that connects early waits in the backlog instead of
falling back), imports the modules a trial needs (``PRELOAD``), then forks one child per connection. A trial
actor (``trial.run_fold``) that finds ``DISTRIB_ZYGOTE`` in its environment sends its request (config path,
overrides, run dir, resume flag, its whole environment and cwd, its PID); the child takes that environment
(``OMP_NUM_THREADS``/``CUDA_VISIBLE_DEVICES`` from Ray, MLflow's tracker variables), sets torch's threads from
``OMP_NUM_THREADS``, writes its stdout/stderr to ``RUN_DIR/trial_output.log`` and runs the same
``train.run``; each epoch's report goes back over the socket and the actor calls ``tune.report`` with it
before the child goes on, so checkpoints, ASHA and failure injection behave as in-process.

Safety. The zygote starts no thread and never touches CUDA before it forks. A child polls its actor's PID and
exits within ~0.2 s of it (a lost node, a stopped trial, a killed sweep); the actor kills the child when
``tune.report`` raises. If the zygote cannot be reached the trial imports and trains in-process, as without
it. GPU trials (``tune.gpus_per_trial > 0``) and DDP trials always train in-process: CUDA in forked children
has not run here (no GPU), and the zygote exits if an import initialized CUDA. Where: ``local_ray.start_ray`` starts one for a private cluster (concurrently with ``ray.init``),
``ray_nodes.start_head/add_worker`` one per node; ``stop_ray``/``stop_cluster`` stop it with the cluster
(its command line names the cluster's temp dir).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from distrib.errors import DistribError

ENV = "DISTRIB_ZYGOTE"  # the node's zygote socket, in the raylet's (so every trial actor's) environment
# the trial stack, without Ray: the child never uses it (the actor reports to Tune), and importing ray.tune
# too would keep the server importing longer while the first trials queue
PRELOAD = (
    "accelerate",
    "kornia",
    "timm",
    "torch.utils.tensorboard",
    "webdataset",
    "distrib.data.loader",
    "distrib.data.transforms",
    "distrib.models",
    "distrib.models.timm_models",
    "distrib.models.genconvit",
    "distrib.training.optim",
    "distrib.training.runlog",
    "distrib.training.setup",
    "distrib.training.trainer",
)
log = logging.getLogger(__name__)


def socket_path(temp_dir: str, name: str = "zygote") -> str:
    """The socket of a cluster's zygote (under the cluster's temp dir, so stopping the cluster stops it)."""
    return str(Path(temp_dir) / f"{name}.sock")


def ready_path(sock: str) -> str:
    """Created once the server has imported the trial stack (``wait_ready``)."""
    return f"{sock}.ready"


def _clear_stale(sock: str) -> None:
    """Remove a socket file left by a server that died (nobody accepts on it); never a live server's."""
    import socket

    if os.path.exists(sock):
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(sock) != 0:
                os.unlink(sock)
    if not os.path.exists(sock) and os.path.exists(ready_path(sock)):
        os.unlink(ready_path(sock))


def wait_ready(sock: str, timeout: float = 120) -> float:
    """Wait until the server at ``sock`` has imported the trial stack; returns the seconds waited. Trials need
    not wait (they queue on the socket): this is for measuring an idle cluster (``distrib bench sweep``)."""
    t0 = time.time()
    while not os.path.exists(ready_path(sock)):
        if not os.path.exists(sock) or time.time() - t0 > timeout:
            raise DistribError(
                f"the trial fork server at {sock} is not serving after {time.time() - t0:.0f} s; see {sock}.log"
            )
        time.sleep(0.05)
    return time.time() - t0


def start(sock: str, log_file: str | Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m distrib.sweep.zygote sock`` and return once its socket is listening."""
    _clear_stale(sock)  # else the wait below would see the old file at once
    out = open(log_file or f"{sock}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distrib.sweep.zygote", sock],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    out.close()
    deadline = time.time() + 60
    while not os.path.exists(sock):  # bound before the imports: up in well under a second
        if proc.poll() is not None or time.time() > deadline:
            raise DistribError(
                f"the trial fork server did not start (exit {proc.poll()}); see {out.name}, "
                "or set tune.fork_server=false"
            )
        time.sleep(0.05)
    return proc


def serve(sock: str) -> None:
    """Bind ``sock``, import the trial stack, then fork a child per connection (never returns)."""
    from multiprocessing.connection import Listener

    _clear_stale(sock)
    listener = Listener(sock, family="AF_UNIX", backlog=64)  # before the imports: early trials queue here
    t0 = time.time()
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # an import's is_available() must not init CUDA
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    if torch.cuda.is_initialized():  # a forked child could not use CUDA: serve nobody, trials import themselves
        log.error("zygote %d: an import initialized CUDA; exiting (trials train in-process)", os.getpid())
        os.unlink(sock)
        raise SystemExit(1)
    log.info(
        "zygote %d: imported the trial stack in %.1f s, %d thread(s); serving %s",
        os.getpid(),
        time.time() - t0,
        threading.active_count(),
        sock,
    )
    Path(ready_path(sock)).touch()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while True:
        conn = listener.accept()
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader workers etc. must be waitable
            try:
                _child(conn)
            finally:
                sys.stdout.flush()  # os._exit skips it: the end of RUN_DIR/trial_output.log
                sys.stderr.flush()
                os._exit(0)
        conn.close()


def _watch(pid: int) -> None:
    """Exit this trial process as soon as the actor that asked for it is gone."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass
        time.sleep(0.2)


def _child(conn) -> None:
    req = conn.recv()
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    threading.Thread(target=_watch, args=(req["actor_pid"],), daemon=True).start()
    run_dir = Path(req["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "trial_output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    conn.send(("pid", os.getpid()))
    try:
        import torch

        from distrib.config import load_config
        from distrib.training import trainer as train

        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:  # the zygote imported torch before Ray chose the trial's CPUs
            torch.set_num_threads(int(threads))

        def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
            conn.send(("report", metrics, checkpoint_dir))
            if conn.recv() != "go":  # the actor stopped the trial
                os._exit(0)

        cfg = load_config(req["config_path"], req["overrides"])
        final = train.run(cfg, str(run_dir), resume=req["resume"], report=report)
        conn.send(("done", final, torch.get_num_threads()))
    except BaseException as e:  # the actor raises it for Tune (retry, or the trial's error)
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))


def available() -> str | None:
    """This node's zygote socket, if the environment names one that exists."""
    sock = os.environ.get(ENV, "")
    return sock if sock and os.path.exists(sock) else None


class Unreachable(Exception):
    """The zygote did not fork a trial process; the caller trains in-process instead."""


def run_in_child(
    sock: str, config_path: str, overrides: list[str], run_dir: Path, resume: bool, report
) -> tuple[dict, int]:
    """``train.run`` in a process forked by the zygote at ``sock``; ``report`` runs here, in the actor.
    Returns train.run's result and the child's torch thread count."""
    from multiprocessing.connection import Client

    try:
        conn = Client(sock, family="AF_UNIX")
        conn.send(
            {
                "config_path": config_path,
                "overrides": list(overrides),
                "run_dir": str(run_dir),
                "resume": resume,
                "env": dict(os.environ),
                "cwd": os.getcwd(),
                "actor_pid": os.getpid(),
            }
        )
        kind, pid = conn.recv()
    except (OSError, EOFError) as e:
        raise Unreachable(f"trial fork server at {sock}: {e}") from e
    out = Path(run_dir) / "trial_output.log"
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                raise DistribError(f"trial process {pid} exited without a result; see {out}") from None
            if msg[0] == "report":
                report(msg[1], msg[2])  # tune.report; raises if Tune stops the trial
                conn.send("go")
            elif msg[0] == "done":
                return msg[1], msg[2]
            else:
                raise DistribError(f"{msg[1]} (trial process {pid}; its traceback is in {out})\n{msg[2]}")
    finally:
        conn.close()
        try:
            os.kill(pid, signal.SIGKILL)  # a no-op once it has exited; never leave it training alone
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # to the log file start() opens
    serve(sys.argv[1])
