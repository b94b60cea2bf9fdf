"""`pip install .` keeps a torch that is already there (a CUDA node's own build): setup.cfg lists ranges.

A real venv under tmp gets the CPU torch 2.13 wheel from /opt/wheels and a matching torchvision (0.28, from
the local index), both older than the lock's; pip then resolves the package for real (a dry run from the
configured indexes) and must not plan to replace either. With exact pins it would install torch 2.14.1.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELS = sorted(glob.glob(f"/opt/wheels/torch-2.13.0+cpu-cp{sys.version_info[0]}{sys.version_info[1]}-*.whl"))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.skipif(not WHEELS, reason="no local cp3XX CPU torch 2.13 wheel in /opt/wheels")
def test_pip_install_keeps_installed_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", WHEELS[0], "torchvision==0.28.0"], check=True, cwd=tmp_path)
    report = tmp_path / "r.json"
    subprocess.run([*pip, "install", "--dry-run", "--report", str(report), str(REPO)], check=True, cwd=tmp_path)
    planned = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "distrib" in planned
    assert "torch" not in planned, f"pip would replace the installed torch 2.13 with {planned.get('torch')}"
    assert "torchvision" not in planned, f"pip would replace torchvision 0.28 with {planned.get('torchvision')}"
