"""The ``distrib`` console script: the one argument parser, a table of subcommand -> library function.

``parser.py`` is the table (argparse), ``commands.py`` calls the library and prints results, and this
module parses, sets up logging, maps errors and signals to exit codes.

Public face: ``main(argv) -> exit code`` (the ``distrib`` console script) and ``build_parser()``.

    distrib data demo --out data/demo
    distrib shard --train train_manifest.csv --val val_manifest.csv --out shards/ --folds 5
    distrib train launch/configs/experiments/debug.yaml --out runs/debug data.shards=shards/
    distrib tune launch/configs/experiments/debug.yaml --grid launch/configs/grids/debug.yaml --out runs/sweep
    distrib run launch/recipes/deepfake_cascade.yaml --out runs/deepfake data.train=train.csv
    distrib bench loader --shards shards/

Library functions take plain values and return dicts; everything printed, and every exit code, is
decided here. Each command imports its stage lazily so ``distrib --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from distrib.cli.commands import strict_json
from distrib.cli.parser import build_parser
from distrib.errors import DistribError
from distrib.runlock import release_all

__all__ = ["main", "build_parser"]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # argparse cannot put positional overrides after an option ('train CFG --out D a.b=1'):
    # collect the leftover 'key=value' words into the subcommand's overrides instead of failing
    args, extra = parser.parse_known_args(argv)
    bad = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["shard", "inspect"]:  # 'distrib shard inspect DIR'
        argv = ["shard-inspect", *argv[2:]]
    args = _parse(build_parser(), argv)
    log = logging.getLogger("distrib")  # the library's notes and warnings reach the user on stderr
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    func: Callable = args.func
    try:
        return _run(args, func)
    finally:
        release_all()


def _run(args: argparse.Namespace, func: Callable) -> int:
    try:
        result = func(args)
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM in tune): where things stand, how to continue
        dist = sys.modules.get("distrib.training.dist")
        if dist is None or dist.is_main():  # one message for a multi-process run, from rank 0
            print(f"distrib {args.command}: interrupted. {_resume_hint(args)}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except DistribError as e:
        print(f"distrib {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"distrib {args.command}: error: {_disk_full(args, e)}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and args.command not in ("bench", "export"):
        print(strict_json(result))
    if args.command == "tune":
        return _sweep_exit(args, result)
    return 0


def _disk_full(a: argparse.Namespace, e: OSError) -> str:
    """ENOSPC in one line: the file, what was written and what is free, and which checkpoint is intact."""
    import shutil

    where = Path(e.filename) if e.filename else None
    if e.strerror and "bytes" in e.strerror:  # checkpoint._save counted what reached the disk
        size = f" ({e.strerror})"
    else:
        size = f" ({where.stat().st_size} bytes written)" if where is not None and where.is_file() else ""
    free = ""
    with contextlib.suppress(OSError):
        free = f", {shutil.disk_usage(_existing_parent(where or Path(getattr(a, 'out', None) or '.'))).free} bytes free"
    intact = "outputs are written to temp names and renamed, so earlier files are intact"
    if a.command == "train":
        from distrib.runs import find_checkpoint

        ckpt = find_checkpoint(a.out)
        intact = f"the last good checkpoint {ckpt} is intact" if ckpt else "no checkpoint had been written yet"
    return (
        f"no space left on the device while writing {where or 'an output file'}{size}{free}; {intact}. "
        "Free space or point --out at a larger disk, then re-run the same command (add --resume for train/tune)."
    )


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _resume_command(a: argparse.Namespace) -> str:
    """The command that continues an interrupted train/tune: the same arguments plus --resume."""
    words = ["distrib", a.command, a.config, *a.overrides, "--out", a.out]
    for flag in ("grid", "address", "storage", "num_cpus", "search", "num_samples", "scheduler"):
        if getattr(a, flag, None) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    return shlex.join([*words, "--resume"])


def _resume_hint(a: argparse.Namespace) -> str:
    if a.command == "train":
        from distrib.runs import find_checkpoint
        from distrib.training.checkpoint import saved_state

        ckpt = find_checkpoint(a.out)
        if ckpt is None:
            return f"No checkpoint was written yet; start again with: {_resume_command(a)}"
        state = saved_state(ckpt)
        return (
            f"The last checkpoint is {ckpt} (epoch {state['epoch']}, step {state['step']}); "
            f"continue with: {_resume_command(a)}"
        )
    if a.command == "tune" and (Path(a.out) / "config.yaml").is_file():
        return f"Finished trials are kept; continue with: {_resume_command(a)}"
    return "Nothing was resumed or left half-written (outputs are written to temp names and renamed)."


def _sweep_exit(a: argparse.Namespace, result: dict) -> int:
    """0 for a finished sweep; 128+signal when it was interrupted; 1 when trials failed (docs/sweeps.md)."""
    status = result.get("status", "done")
    if status == "interrupted":
        sig = result.get("signal") or 2
        print(
            f"distrib tune: interrupted (signal {sig}) with {result['done']} of {result['trials']} trials "
            f"finished; {_resume_hint(a)}",
            file=sys.stderr,
        )
        return 128 + sig
    if status == "incomplete":
        best = (
            "the best config was chosen among the configs that finished every fold only"
            if result.get("best")
            else "no config finished every fold, so there is no best config"
        )
        print(
            f"distrib tune: {result['trials'] - result['done']} of {result['trials']} trials failed "
            f"({len(result['errors'])} error(s); see sweep_summary.csv and the trial dirs' logs); {best}. "
            f"Fix the cause, then retry the failed trials with: {_resume_command(a)}",
            file=sys.stderr,
        )
        return 1
    return 0
