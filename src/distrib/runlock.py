"""One writer per output folder: an exclusive ``fcntl.flock`` on ``.distrib.lock`` inside it.

The kernel drops the lock when the holder exits, however it dies (SIGKILL included), so a stale lock
file never blocks a later run; the file itself stays and only records the last holder's PID and command
line, which a refused second writer names.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from distrib.errors import DistribError

LOCK_NAME = ".distrib.lock"
_HELD: dict[str, int] = {}  # resolved lock path -> fd, held until this process exits

__all__ = ["LOCK_NAME", "lock_output", "release_all"]


def _lock_path(out: Path, is_dir: bool) -> Path:
    return out / LOCK_NAME if is_dir else out.parent / f".{out.name}.lock"


def lock_output(out: str | Path, cmdline: str, is_dir: bool = True) -> Path:
    """Take the writer lock of folder ``out`` (or of file ``out``, beside it) for the rest of this process.

    ``cmdline`` (the command as the user typed it) is recorded beside the PID for a refused second writer.
    Under a multi-process launcher only global rank 0 takes it: the other ranks write into the same folder
    as part of the same run. A second writer gets a one-line DistribError naming the holder.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return _lock_path(Path(out), is_dir)
    out = Path(out)
    path = _lock_path(out, is_dir)
    key = os.path.realpath(path)
    if key in _HELD:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DistribError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        pid, _, cmd = holder.partition(" ")
        raise DistribError(
            f"{out} is being written by another process (PID {pid}: {cmd or '?'}); "
            f"wait for it to finish or stop it, or choose another --out (lock: {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {cmdline}\n".encode())
    os.fsync(fd)
    _HELD[key] = fd
    return path


def release_all() -> None:
    """Drop every lock this process took (the CLI calls it when a command ends, so in-process callers such as
    tests or a notebook do not keep a folder locked until they exit)."""
    while _HELD:
        _, fd = _HELD.popitem()
        os.close(fd)
