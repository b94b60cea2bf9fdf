"""Outputs never clobber inputs: every command resolves its outputs against what it reads, before doing anything.

The rule for an output that already exists, one for every command: an existing output *file* is
replaced only atomically (``atomic.atomic_path``: the old file stays complete until the new one is
renamed over it) and the command says ``replaced <path>`` on stderr once it succeeded. Existing output
*folders* keep their own rules (``--overwrite`` / ``--resume``), which the stages check. Refused, with a
one-line ``DistribError`` before any file, process group or cluster exists:

- an output that is one of the command's input files or folders;
- an output inside a run, shard or sweep folder the command reads (a predictions CSV written into the
  shard directory it scores, an ONNX file over ``best_model.pth``);
- an existing directory where a file is meant, an existing file where a folder is meant, and a path
  whose nearest existing parent cannot be written.

Paths are compared after ``realpath`` (symlinks and ``..`` resolved), so a symlink to an input is an input.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from distrib.errors import DistribError

log = logging.getLogger("distrib")

__all__ = ["OutputCheck", "check_outputs", "real"]


def real(path: str | Path) -> Path:
    """``path`` with ``~``, symlinks and ``..`` resolved (a path that does not exist yet resolves lexically)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(flag: str, path: Path) -> None:
    """The folder that will hold ``path`` can be created and written (checked on its nearest existing parent)."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise DistribError(f"{flag} {path}: {base} is a file, not a folder; choose an output path under a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DistribError(
            f"{flag} {path}: cannot write in {base} (permission denied); "
            "choose a folder you can write to, or fix its permissions"
        )


@dataclass
class OutputCheck:
    """What ``check_outputs`` found: the output files that existed before the command ran."""

    command: str
    existing: list[Path] = field(default_factory=list)

    def report(self) -> None:
        """Say ``replaced <path>`` (stderr) for each output file that existed; call once the command succeeded."""
        for p in self.existing:
            if p.is_file():
                log.info(f"distrib {self.command}: replaced {p}")


def check_outputs(
    command: str,
    *,
    files: dict[str, str | Path | None] | None = None,
    dirs: dict[str, str | Path | None] | None = None,
    inputs: list[str | Path | None] = (),
    read_dirs: list[str | Path | None] = (),
) -> OutputCheck:
    """Refuse outputs that would clobber inputs (see the module docstring); return the check for ``report()``.

    ``files`` / ``dirs``: label (the flag, e.g. ``--out``) -> output file / folder. ``inputs``: files or
    folders the command reads; an output may not be one of them. ``read_dirs``: run, shard, sweep or image
    folders the command reads; nothing may be written inside them. ``None`` entries are skipped.
    """
    ins = [real(p) for p in inputs if p]
    folders = [real(p) for p in read_dirs if p]
    result = OutputCheck(command)
    for kind, table in (("file", files or {}), ("folder", dirs or {})):
        for flag, raw in table.items():
            if not raw:
                continue
            out = real(raw)
            shown = f"{flag} {raw}" + (f" (= {out})" if str(out) != str(raw) else "")
            for p in ins:
                if out == p or (kind == "folder" and p.is_dir() and _inside(out, p)):
                    raise DistribError(
                        f"{shown} is one of its inputs ({p}); writing there would destroy "
                        "it, choose another output path"
                    )
            for d in folders:
                if _inside(out, d):
                    raise DistribError(
                        f"{shown} is inside {d}, a folder this command reads; write the output somewhere else"
                    )
            if kind == "file" and out.is_dir():
                raise DistribError(
                    f"{shown} is an existing directory, but a file is meant; "
                    "name a file (inside that directory or elsewhere)"
                )
            if kind == "folder" and out.exists() and not out.is_dir():
                raise DistribError(f"{shown} is an existing file, but a folder is meant; choose a folder path")
            _writable(flag, out if kind == "file" else out / "x")
            if kind == "file" and out.is_file():
                result.existing.append(out)
    return result
