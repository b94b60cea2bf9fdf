"""The private local Ray cluster a sweep starts: loopback only, recorded, and always stopped.

- **Loopback.** Every Ray server picks its bind address from the node IP: gcs_server, raylet, the core
  workers and the agents bind to 127.0.0.1 only when the node IP *is* 127.0.0.1, else to all interfaces.
  On Linux ``ray.init(_node_ip_address="127.0.0.1")`` is not enough: ``services.get_node_ip_address``
  returns the routable IP unless ``ray_constants.ENABLE_RAY_CLUSTER`` is False, which is what
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` sets (read at ``import ray``; patched too if ray was imported).
- **Records.** Right after ``ray.init`` the PIDs, create times and command lines of the processes it started
  go to ``SWEEP_DIR/ray_pids.json`` (with the driver's own), so a driver killed by SIGKILL leaves a list of
  its orphans (the dashboard and runtime-env agents outlive it by ~60 s) that the next start stops, after
  checking that the recorded driver is gone.
- **Distrust.** The sweep dir is user data: anyone who can write it could name any folder or PID. A recorded
  PID is acted on only when its create time *and* command line match the record; a recorded temp dir only
  when it is one ``_temp_dir`` makes (directly under the system temp dir or /tmp, ``distrib-ray-`` prefix,
  a real directory owned by this user). Anything else is ignored with a warning.
- **Stop.** ``stop_ray`` shuts Ray down, stops any recorded straggler, removes the temp dir (Ray keeps it)
  and the PID file. SIGTERM is turned into SIGINT while the cluster runs, so Tune stops gracefully and
  the driver's ``finally`` stops the cluster instead of dying with it running.
- **Temp dir.** Under the system temp dir (short: AF_UNIX socket paths stay under 107 bytes), never in
  the sweep dir.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from distrib.atomic import write_json
from distrib.errors import DistribError, Interrupted

log = logging.getLogger(__name__)
PID_FILE = "ray_pids.json"  # in the sweep dir: this driver and the Ray processes it started
_STATE: dict = {}  # the cluster this process started: pid_file, temp_dir, previous SIGTERM handler, signal seen


TEMP_PREFIX = "distrib-ray-"  # every cluster temp dir this project creates starts with it


def _temp_dir() -> str:
    """A fresh dir under the system temp dir, or /tmp when that is too deep for Ray's socket paths."""
    base = tempfile.gettempdir()
    if len(str(Path(base).resolve())) > 28:  # + ~12 (mkdtemp) + ~66 (Ray session/sockets) <= 107
        base = "/tmp"
    return tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=base)


def is_own_temp_dir(path) -> bool:
    """True if ``path`` could be a dir ``_temp_dir`` made: a real (not symlinked) directory with its prefix,
    directly under the system temp dir or /tmp, owned by this user. A PID file naming anything else is not
    trusted with ``rmtree``."""
    import stat

    if not isinstance(path, str) or not path:
        return False
    p = Path(path)
    if not p.is_absolute() or not p.name.startswith(TEMP_PREFIX) or ".." in p.parts:
        return False
    bases = {os.path.realpath(tempfile.gettempdir()), os.path.realpath("/tmp")}
    if os.path.realpath(p.parent) not in bases:
        return False
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _uses_dir(p, d: str) -> bool:
    """A Ray process names ``d`` in its cmdline or keeps a log file open under it (agents retitle themselves)."""
    import psutil

    try:
        return any(d in a for a in p.cmdline()) or any(f.path.startswith(d) for f in p.open_files())
    except psutil.Error:
        return False


def _same_process(rec: dict):
    """The live process of a record, or None if it exited or its PID now belongs to another process: its
    create time and (when recorded) its command line must both match."""
    import psutil

    try:
        p = psutil.Process(int(rec["pid"]))
        if abs(p.create_time() - float(rec["create_time"])) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        if "cmdline" in rec and p.cmdline() != rec["cmdline"]:
            return None
        return p
    except (psutil.Error, KeyError, TypeError, ValueError, OverflowError):
        return None


def _not_ours(p, others: set[int]) -> bool:
    """True if ``p`` descends from a process that already ran before this cluster started (``others``)."""
    import psutil

    try:
        return p.pid in others or any(a.pid in others for a in p.parents())
    except psutil.Error:
        return True


def cluster_processes(temp_dir: str) -> list:
    """psutil.Process of every process the local cluster runs: this driver's descendants plus users of the temp dir.

    Descendants that predate ``start_ray`` (and theirs), e.g. a ``ray start --head`` this program launched
    itself, belong to someone else's cluster and are left out, so ``stop_ray`` never stops them."""
    import psutil

    me = psutil.Process()
    others = _STATE.get("children_before", set())
    procs = {p.pid: p for p in me.children(recursive=True) if not _not_ours(p, others)}
    for p in psutil.process_iter():
        if p.pid != me.pid and p.pid not in procs and _uses_dir(p, temp_dir):
            procs[p.pid] = p
    return list(procs.values())


def record_driver(pid_file: Path, temp_dir: str | None) -> list[dict]:
    """Write this driver and (after ``ray.init``) the cluster's processes to ``pid_file``."""
    import psutil

    me = psutil.Process()
    recs = []
    for p in cluster_processes(temp_dir) if temp_dir else []:
        try:
            recs.append({"pid": p.pid, "create_time": p.create_time(), "name": p.name(), "cmdline": p.cmdline()})
        except psutil.Error:
            pass
    driver = {"driver": me.pid, "driver_create_time": me.create_time(), "driver_cmdline": me.cmdline()}
    write_json(pid_file, {**driver, "temp_dir": temp_dir, "procs": recs}, indent=1)
    return recs


def _recorded_processes(recs) -> tuple[list, list[int]]:
    """The live processes of ``recs`` whose create time and command line both match, and the live PIDs of
    the records that do not match (or carry no command line)."""
    import psutil

    live, unmatched = [], []
    for rec in recs if isinstance(recs, list) else []:
        p = _same_process(rec) if isinstance(rec, dict) and isinstance(rec.get("cmdline"), list) else None
        if p is not None:
            live.append(p)
            continue
        pid = rec.get("pid") if isinstance(rec, dict) else rec
        if isinstance(pid, int) and pid > 0 and psutil.pid_exists(pid):
            unmatched.append(pid)
    return live, unmatched


def _users_of(temp_dir: str) -> list:
    """This user's processes (not this one) that name ``temp_dir`` or keep a file open under it."""
    import psutil

    me, uid = os.getpid(), os.getuid()
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != me and p.uids().real == uid and _uses_dir(p, temp_dir):
                out.append(p)
        except psutil.Error:
            pass
    return out


def reap(pid_file: Path, grace_s: float = 2.0) -> list[str]:
    """Stop the recorded processes of a dead driver (SIGTERM, then SIGKILL); remove its temp dir and the file.

    Only what ``is_own_temp_dir`` and ``_recorded_processes`` accept is touched (the file may be crafted).
    Raises DistribError if the recorded driver is still running: two drivers must not share a sweep dir.
    """
    pid_file = Path(pid_file)
    if not pid_file.is_file():
        return []
    try:
        data = json.loads(pid_file.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", pid_file)
        pid_file.unlink(missing_ok=True)
        return []
    driver = {"pid": data.get("driver"), "create_time": data.get("driver_create_time", 0.0)}
    if "driver_cmdline" in data:
        driver["cmdline"] = data["driver_cmdline"]
    if driver["pid"] != os.getpid() and _same_process(driver) is not None:
        raise DistribError(
            f"another distrib tune (pid {driver['pid']}) is running on {pid_file.parent}; wait "
            f"for it or stop it (kill {driver['pid']}), or choose another --out"
        )
    live, unmatched = _recorded_processes(data.get("procs"))
    td = data.get("temp_dir")
    if td and not is_own_temp_dir(td):
        if isinstance(td, str) and os.path.lexists(td):
            log.warning(
                "%s names temp_dir %s, which is not a %s* folder of this user under %s; left alone",
                pid_file,
                td,
                TEMP_PREFIX,
                tempfile.gettempdir(),
            )
        td = None
    if td:  # workers started after the record was written, and agents that retitled themselves
        seen = {p.pid for p in live}
        live += [p for p in _users_of(td) if p.pid not in seen]
    left = sorted(set(unmatched) - {p.pid for p in live})
    if left:
        log.warning(
            "%s names running process(es) %s whose start time or command line differ from the record (or were "
            "not recorded); left alone",
            pid_file,
            ", ".join(map(str, left)),
        )
    stopped = terminate(live, grace_s)
    if td:
        shutil.rmtree(td, ignore_errors=True)
    pid_file.unlink(missing_ok=True)
    if stopped and driver["pid"] != os.getpid():
        log.warning(
            "stopped %d Ray process(es) left by the killed sweep driver %s: %s",
            len(stopped),
            driver["pid"],
            ", ".join(stopped),
        )
    return stopped


def terminate(procs: list, grace_s: float) -> list[str]:
    """SIGTERM ``procs``, SIGKILL those still alive after ``grace_s``; returns "pid (name)" of each."""
    import psutil

    stopped = []
    for p in procs:
        try:
            stopped.append(f"{p.pid} ({p.name()})")
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:  # orphaned agents ignore SIGTERM while they wait ~60 s on the dead GCS
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return stopped


def _sigterm_as_sigint(signum, frame) -> None:
    _STATE["signal"] = signum
    handler = signal.getsignal(signal.SIGINT)
    if handler is signal.default_int_handler or getattr(handler, "raises", False):  # not Tune's graceful stop
        raise Interrupted(signum)  # a KeyboardInterrupt: `finally` blocks stop the cluster
    signal.raise_signal(signal.SIGINT)  # Tune's handler stops the experiment and saves its state


PROBE_TIMEOUT_S = 5.0  # a GCS answers a TCP connect at once; ray.init on a dead address retries forever


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT``, ``[IPv6]:PORT`` or ``ray://HOST:PORT``; None for Ray's ``auto``/``local``."""
    rest = address.strip().removeprefix("ray://")
    if rest in ("auto", "local", ""):
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistribError(f"--address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379, a `ray start --head` port)")
    return host.strip("[]"), int(port)


def check_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in ``timeout`` seconds when nothing accepts a TCP connection at ``address``: ``ray.init`` would
    retry the GCS there forever. Called before a sweep writes anything."""
    import socket

    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            return
    except OSError as e:
        why = f"no answer in {timeout:.0f} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
    raise DistribError(
        f"no Ray cluster answers at --address {address} ({why}); start one there (ray start --head --port "
        f"{target[1]}), fix the address, or drop --address to run a local cluster"
    )


def _gcs_on_loopback(address: str) -> bool:
    """True if ``address`` names 127.0.0.1/localhost and something listens there (a loopback-bound GCS)."""
    import socket

    host, _, port = address.rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
        return False
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=2):
            return True
    except OSError:
        return False


def start_ray(out_dir: Path, address: str | None, num_cpus: int | None, fork_server: bool = False) -> bool:
    """Connect to ``address`` or start a loopback-only local cluster; True if this call started Ray.

    ``fork_server``: the local cluster gets a trial fork server (``sweep.zygote``), started before ``ray.init``
    so its imports overlap Ray's start-up; a cluster at ``address`` has whatever its nodes were started with."""
    # A cluster whose GCS listens on 127.0.0.1 (`sweep.ray_nodes`) needs this driver on 127.0.0.1 too; one
    # on a routable IP (another host, or a `ray start` without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) needs
    # Ray's Linux default, which turns a 127.0.0.1 address into the routable IP.
    if address:
        check_address(address)
    loopback = not address or _gcs_on_loopback(address)
    user_set = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in os.environ
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before the first `import ray`
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import psutil
    import ray
    import ray._private.ray_constants as ray_constants

    if ray.is_initialized():
        return False
    out_dir.mkdir(parents=True, exist_ok=True)
    pid_file = out_dir / PID_FILE
    reap(pid_file)  # orphans of a SIGKILLed driver; refuses if that driver is alive
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # num_to_keep=1 forces a state snapshot per checkpoint; that is intended, so mute Tune's warning about it
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    temp_dir = None if address else _temp_dir()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}  # not this cluster's
    _STATE.update(pid_file=pid_file, temp_dir=temp_dir, signal=None, children_before=children_before)
    if address:
        if not user_set:  # ray may have been imported before the variable was set (or by an earlier sweep)
            ray_constants.ENABLE_RAY_CLUSTER = not loopback
        record_driver(pid_file, None)  # no processes of ours, but marks the sweep dir as in use
        ray.init(address=address, log_to_driver=False)
    else:
        ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
        try:
            if fork_server:  # named by the temp dir: recorded, reaped and stopped with the cluster
                from distrib.sweep import zygote

                sock = zygote.socket_path(temp_dir)
                zygote.start(sock)
                _STATE["zygote_env"] = os.environ.get(zygote.ENV)
                os.environ[zygote.ENV] = sock  # ray.init's raylet, so every trial actor, inherits it
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                _temp_dir=temp_dir,
                log_to_driver=False,
            )
        except BaseException:  # a failed or interrupted init: stop whatever it had started
            record_driver(pid_file, temp_dir)
            stop_ray()
            raise
        record_driver(pid_file, temp_dir)
        node_id = ray.get_runtime_context().get_node_id()  # public API: this driver's node in ray.nodes()
        node_ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), None)
        if node_ip != "127.0.0.1":
            stop_ray()
            raise DistribError(
                f"the local Ray cluster came up on {node_ip}, not 127.0.0.1; set "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (or pass --address of a cluster you started)"
            )
    if _is_main_thread():
        _STATE["prev_sigterm"] = signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    return True


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stop_ray() -> int | None:
    """Shut down what ``start_ray`` started; returns the signal (SIGTERM) that interrupted it, if any."""
    import ray

    ray.shutdown()
    if "zygote_env" in _STATE:  # this driver's later sweeps must not see the removed socket
        from distrib.sweep.zygote import ENV

        if _STATE["zygote_env"] is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = _STATE["zygote_env"]
    if "prev_sigterm" in _STATE and _is_main_thread():
        signal.signal(signal.SIGTERM, _STATE.pop("prev_sigterm") or signal.SIG_DFL)
    if _STATE.get("pid_file") is not None:
        reap(_STATE["pid_file"])
    if _STATE.get("temp_dir"):
        shutil.rmtree(_STATE["temp_dir"], ignore_errors=True)
    sig = _STATE.get("signal")
    _STATE.clear()
    return sig


def listening_sockets(procs) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP LISTEN socket the given processes hold."""
    import psutil

    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


__all__ = [
    "PID_FILE",
    "TEMP_PREFIX",
    "check_address",
    "is_own_temp_dir",
    "start_ray",
    "stop_ray",
    "reap",
    "terminate",
    "record_driver",
    "cluster_processes",
    "listening_sockets",
]
