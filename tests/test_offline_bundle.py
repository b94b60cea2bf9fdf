"""The offline GPU node's tools: the slim Ray wheel of scripts/offline_bundle.py installs and runs a Tune trial,
and scripts/gpu_report.py turns the check's records (or pytest's junit XML) into a report that lists every outcome.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, subprocess_env

sys.path.insert(0, str(REPO / "scripts"))
offline_bundle = importlib.import_module("offline_bundle")
gpu_report = importlib.import_module("gpu_report")

# the sweep's own local cluster (loopback, short temp dir, stopped after), one Tune trial on it
TUNE_ONE_TRIAL = """
import json, sys
from pathlib import Path
import ray
from ray import tune
from distrib.sweep.local_ray import start_ray, stop_ray
assert ray.__file__.startswith(sys.argv[1]), ray.__file__
start_ray(Path(sys.argv[2]), None, 1)
try:
    def trial(config):
        tune.report({"score": config["x"] * 2})
    run = tune.RunConfig(storage_path=sys.argv[2], verbose=0)
    grid = tune.Tuner(trial, param_space={"x": 3}, run_config=run).fit()
    print(json.dumps({"score": grid[0].metrics["score"], "errors": grid.num_errors}))
finally:
    stop_ray()
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_slim_ray_wheel_installs_and_runs_a_tune_trial(tmp_path):
    """The lock's Ray wheel for this Python, repacked as --slim does (no ray/jars, no dashboard client, big
    members LZMA), installed by pip --no-index --no-deps, imported ahead of the venv's own Ray."""
    version = offline_bundle.parse_lock([REPO / "constraints.txt"])["ray"]
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    src = offline_bundle.Downloader(py, tmp_path / "cache")({"ray": version})["ray"]
    rule = offline_bundle.SLIM["ray"]
    slim = tmp_path / src.name
    dropped, packed = offline_bundle.slim_wheel(src, slim, rule["drop"], rule["keep"])
    assert dropped > 0 and packed > 0
    with zipfile.ZipFile(slim) as z:
        names = z.namelist()
        assert not [n for n in names if n.startswith(rule["drop"])]
        assert any(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist())
    assert slim.stat().st_size < src.stat().st_size * 0.7

    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-index", "--no-deps"]
    subprocess.run([*pip, "--no-compile", "--target", str(target), str(slim)], check=True)
    assert not (target / "ray" / "jars").exists()
    assert (target / "ray" / "core" / "src" / "ray" / "raylet" / "raylet").stat().st_mode & 0o111

    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = f"{target}:{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-c", TUNE_ONE_TRIAL, str(target), str(tmp_path / "tune")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"score": 6, "errors": 0}


def _plant(out, env: dict) -> None:
    (out / "env.json").write_text(json.dumps(env))
    gpu_report.record_step(out, "install", 0, 12.5, 90)
    gpu_report.record_step(out, "pytest_gpu", 124, 180.0, 180)
    (out / "bench").mkdir()
    (out / "bench" / "trainer_mobilenetv4_s_224.out").write_text(
        'progress\n{"images_per_s": 812.5, "peak": {"gpu_mib": 3071}}\n'
    )


def test_gpu_report_lists_every_outcome_and_says_no_cuda(tmp_path):
    _plant(tmp_path, {"torch": "2.11.0+cu130", "cuda_build": "13.0", "cuda_available": False})
    (tmp_path / "junit.xml").write_text(
        """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gpu" name="test_train_on_one_gpu[bf16]" time="41.2"/>
<testcase classname="tests.test_gpu" name="test_resume_on_gpu" time="3.0"><failure message="AssertionError: loss 0.7 | 0.6">tb</failure></testcase>
<testcase classname="tests.test_gpu" name="test_nccl" time="0.1"><error message="fixture broke">tb</error></testcase>
<testcase classname="tests.test_gpu" name="test_predict_on_cuda" time="0"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>"""
    )
    r = gpu_report.write(tmp_path)
    md = (tmp_path / "gpu_report.md").read_text()
    assert json.loads((tmp_path / "gpu_report.json").read_text())["test_counts"] == r["test_counts"]
    assert r["test_counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    assert "no CUDA here" in md
    for row in (
        "| tests/test_gpu.py::test_train_on_one_gpu[bf16] | passed | 41.2 |",
        "| tests/test_gpu.py::test_resume_on_gpu | failed | 3.0 | AssertionError: loss 0.7 \\| 0.6 |",
        "| tests/test_gpu.py::test_nccl | error |",
        "| tests/test_gpu.py::test_predict_on_cuda | skipped | 0.0 | needs a CUDA GPU |",
        "| install | ok | 12.5 | 90 |",
        "| pytest_gpu | timed out | 180.0 | 180 |",
        "| images_per_s | 812.5 |",
        "| peak.gpu_mib | 3071 |",
        "| torch | 2.11.0+cu130 |",
    ):
        assert row in md, row


def test_gpu_report_prefers_the_per_test_records_names_tests_not_run_and_steps_not_ok(tmp_path):
    _plant(tmp_path, {"torch": "2.11.0+cu130", "cuda_available": True, "device": "NVIDIA H100 80GB HBM3"})
    rows = [
        {"test": "tests/test_gpu.py::test_train_on_one_gpu[bf16]", "when": "call", "outcome": "passed",
         "seconds": 40.0, "reason": ""},
        {"test": "tests/test_gpu.py::test_deepspeed_zero2_on_one_gpu", "when": "call", "outcome": "failed",
         "seconds": 9.5, "reason": "RuntimeError: NCCL error"},
    ]  # fmt: skip
    (tmp_path / "tests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (tmp_path / "junit.xml").write_text("<testsuites/>")  # cut off before pytest wrote it: the records win
    planned = [rows[0]["test"], "tests/test_gpu.py::test_ray_sweep_two_trials_share_the_gpu", rows[1]["test"]]
    (tmp_path / "tests.jsonl.order").write_text("\n".join(planned) + "\n")
    r = gpu_report.write(tmp_path)
    md = (tmp_path / "gpu_report.md").read_text()
    assert r["test_counts"] == {"passed": 1, "failed": 1, "not run": 1}
    assert "| tests/test_gpu.py::test_ray_sweep_two_trials_share_the_gpu | not run | 0 | step budget |" in md
    assert "no CUDA" not in md
    assert "steps not ok: pytest_gpu" in md
    assert "| tests/test_gpu.py::test_deepspeed_zero2_on_one_gpu | failed | 9.5 | RuntimeError: NCCL error |" in md
