"""Does pip resolve distrib for this interpreter, without installing anything? Run: make resolve PYTHON=python3.12

Two dry runs in a throwaway venv of the running interpreter, each with a `--report`: the locked set that
`make install` installs (`-c CONSTRAINTS '.[all,test]'`: every pinned version must have a wheel, or an sdist
that builds, for this Python), and a plain `pip install .` (the ranges of setup.cfg, what a user's machine gets).
A dry run reads only wheel metadata, so it costs seconds where the install itself, with its several GB of CUDA
torch, costs many minutes. Exit 1 with pip's own error when either does not resolve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dry_run(python: Path, args: list[str], report: Path) -> dict[str, str]:
    """Package -> version pip would install; pip's output (minus the local index's noise) on a failure."""
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--dry-run"]
    proc = subprocess.run([*cmd, "--report", str(report), *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        noise = "is ignored: it is neither a file nor a directory"
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if noise not in ln]
        sys.exit(
            f"pip install --dry-run {' '.join(args)} does not resolve on Python {sys.version.split()[0]}:\n"
            + "\n".join(lines)
        )
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--constraints", default="constraints.txt", help="the lock make install uses for this Python")
    a = ap.parse_args()
    if not (REPO / a.constraints).is_file():
        sys.exit(f"{a.constraints} not found in {REPO}: pass the lock file, e.g. --constraints constraints.txt")
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        runs = {
            f"-c {a.constraints} '.[all,test]'": _dry_run(
                python, ["-c", a.constraints, ".[all,test]"], Path(tmp) / "locked.json"
            ),
            "'.' (ranges only)": _dry_run(python, ["."], Path(tmp) / "plain.json"),
        }
    for what, planned in runs.items():
        for name in ("distrib", "torch"):
            if name not in planned:
                sys.exit(f"Python {py}: pip install --dry-run {what} resolved without {name}: {sorted(planned)}")
        print(f"Python {py}: pip install {what} resolves: {len(planned)} packages, torch {planned['torch']}")
    print(f"Python {py}: resolved in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
