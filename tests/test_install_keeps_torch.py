"""`pip install .` keeps a torch that is already there (a CUDA node's own build): setup.cfg lists ranges.

A real venv under tmp holds torch 2.13 (the CPU wheel in /opt/wheels) and torchvision 0.28 (from the local
index), both older than the lock's; pip then resolves the package for real (a dry run from the configured
indexes) and must not plan to replace either. With exact pins it would install torch 2.14.1.

pip's resolver reads only what an installed distribution's ``.dist-info`` says, so each wheel's own
``.dist-info`` (its real METADATA and RECORD) is unpacked into the venv, not its 800 MB of binaries: what pip
sees is exactly what a full install would show it, and the test writes ~30 MB instead of ~830 MB.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEELS = sorted(glob.glob(f"/opt/wheels/torch-2.13.0+cpu-cp{sys.version_info[0]}{sys.version_info[1]}-*.whl"))


def _install_metadata_only(wheel: Path, site: Path) -> str:
    """Unpack the wheel's .dist-info into ``site``; return the distribution's name as pip will list it."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")]
        zf.extractall(site, members=names)
    (site / names[0].split("/")[0] / "INSTALLER").write_text("pip\n")
    return names[0].split("/")[0]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.skipif(not WHEELS, reason="no local cp3XX CPU torch 2.13 wheel in /opt/wheels")
def test_pip_install_keeps_installed_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "download", "--no-deps", "-d", str(tmp_path / "w"), "torchvision==0.28.0"], check=True)
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    held = [_install_metadata_only(Path(w), site) for w in [WHEELS[0], *sorted((tmp_path / "w").glob("*.whl"))]]
    listed = subprocess.run([*pip[:-1], "list", "--format", "json"], check=True, capture_output=True, text=True).stdout
    versions = {d["name"]: d["version"] for d in json.loads(listed)}
    assert versions.get("torch") == "2.13.0+cpu" and versions.get("torchvision") == "0.28.0", (held, versions)
    report = tmp_path / "r.json"
    subprocess.run([*pip, "install", "--dry-run", "--report", str(report), str(REPO)], check=True, cwd=tmp_path)
    planned = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "distrib" in planned
    assert "torch" not in planned, f"pip would replace the installed torch 2.13 with {planned.get('torch')}"
    assert "torchvision" not in planned, f"pip would replace torchvision 0.28 with {planned.get('torchvision')}"
