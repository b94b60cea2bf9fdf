"""One writer per output folder: an exclusive ``fcntl.flock`` on ``.distrib.lock`` inside it.

The kernel drops the lock when the holder exits, however it dies (SIGKILL included), so a stale lock
file never blocks a later run; it only records the last holder's PID and command line, which a refused
second writer names. A command that ends normally removes its lock file, and the folders the lock made
when nothing else was written into them, so a refused or failed command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from distrib.errors import DistribError

LOCK_NAME = ".distrib.lock"
_HELD: dict[str, tuple[int, Path, Path | None]] = {}  # resolved lock path -> (fd, path, first folder it made)

__all__ = ["LOCK_NAME", "lock_output", "release_all"]


def _lock_path(out: Path, is_dir: bool) -> Path:
    return out / LOCK_NAME if is_dir else out.parent / f".{out.name}.lock"


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s chain that does not exist yet (what mkdir(parents=True) makes)."""
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def lock_output(out: str | Path, cmdline: str, is_dir: bool = True) -> Path:
    """Take the writer lock of folder ``out`` (or of file ``out``, beside it) until ``release_all``/exit.

    ``cmdline`` (the command as the user typed it) is recorded beside the PID for a refused second writer.
    Under a multi-process launcher only global rank 0 takes it: the other ranks write into the same folder
    as part of the same run. A second writer gets a one-line DistribError naming the holder.
    """
    out = Path(out)
    path = _lock_path(out, is_dir)
    key = os.path.realpath(path)
    if int(os.environ.get("RANK", "0")) != 0 or key in _HELD:
        return path
    made = _first_missing(path.parent)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DistribError(
                f"cannot write to --out {out}: {e.strerror or e} ({e.filename or path}); "
                "choose a directory you can write to, or fix its permissions"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, _, cmd = _holder(path).partition(" ")
            raise DistribError(
                f"{out} is being written by another process (PID {pid}: {cmd or '?'}); "
                f"wait for it to finish or stop it, or choose another --out (lock: {path})"
            ) from None
        try:  # the holder before us may have removed the file between our open and flock: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {cmdline}\n".encode())
    os.fsync(fd)
    _HELD[key] = (fd, path, made)
    return path


def release_all() -> None:
    """Drop every lock this process took, removing the lock file and the empty folders the lock made (the CLI
    calls it when a command ends, so in-process callers such as tests or a notebook hold nothing afterwards)."""
    while _HELD:
        _, (fd, path, made) = _HELD.popitem()
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked, so a waiting writer re-checks the inode (see lock_output)
        os.close(fd)
        if made is None:
            continue
        for folder in [path.parent, *path.parent.parents]:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
            if folder == made:
                break
