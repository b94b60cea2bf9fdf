"""Issue 27.5: a crafted ``SWEEP_DIR/ray_pids.json`` can make ``distrib tune --resume`` neither delete a folder
it names nor signal a process it names. Real ``distrib tune`` subprocess, real victim folder and process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import psutil

from conftest import PYTHON, REPO, subprocess_env

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_crafted_ray_pids_json_deletes_no_folder_and_kills_no_process(tmp_path):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "precious.txt").write_text("keep me")
    link = tmp_path / "distrib-ray-crafted"  # the project's prefix under the child's TMPDIR, but a symlink
    link.symlink_to(victim_dir)
    # a real `sleep` whose argv names the folder (argv[0]), as an unrelated program using it would
    victim = subprocess.Popen([str(victim_dir / "sleep"), "300"], executable=shutil.which("sleep"))
    try:
        started = psutil.Process(victim.pid).create_time()
        sweep = tmp_path / "sweep"
        sweep.mkdir()
        crafted = {
            "driver": _dead_pid(),
            "driver_create_time": 0.0,
            "temp_dir": str(victim_dir),
            "procs": [
                {"pid": victim.pid, "create_time": started, "name": "sleep"},  # right start time, no cmdline
                {"pid": victim.pid, "create_time": started, "name": "raylet", "cmdline": ["raylet"]},
                {"pid": victim.pid, "create_time": started - 5, "cmdline": psutil.Process(victim.pid).cmdline()},
            ],
        }
        (sweep / "ray_pids.json").write_text(json.dumps(crafted))
        (tmp_path / "grid.yaml").write_text("optim.lr: [1.0e-3]\n")
        args = [DEBUG, "tune.embed_best=false", "--grid", tmp_path / "grid.yaml", "--out", sweep, "--resume"]
        runs = [crafted, {**crafted, "temp_dir": str(link)}]
        for data in runs:
            (sweep / "ray_pids.json").write_text(json.dumps(data))
            proc = subprocess.run(
                [PYTHON, "-m", "distrib", "tune", *map(str, args)],
                cwd=REPO,
                env=subprocess_env(tmp_path),
                capture_output=True,
                text=True,
                timeout=300,
            )
            time.sleep(0.5)  # a SIGTERM sent by the resume path would have landed by now
            assert victim.poll() is None, f"the victim process was killed: {proc.stderr[-2000:]}"
            assert (victim_dir / "precious.txt").read_text() == "keep me", proc.stderr[-2000:]
            assert link.is_symlink()
            err = proc.stderr
            assert "Traceback" not in err, err[-3000:]
            assert f"names temp_dir {data['temp_dir']}" in err and "left alone" in err, err[-3000:]
            assert f"running process(es) {victim.pid}" in err, err[-3000:]
    finally:
        if victim.poll() is None:
            os.kill(victim.pid, 9)
        victim.wait()


def test_own_temp_dir_is_only_a_prefixed_dir_of_this_user_under_the_temp_dir(tmp_path):
    from distrib.sweep.local_ray import _temp_dir, is_own_temp_dir

    own = _temp_dir()
    try:
        assert is_own_temp_dir(own)
        assert not is_own_temp_dir(str(tmp_path))  # no prefix
        assert not is_own_temp_dir(own + "/../" + os.path.basename(own))
        nested = tmp_path / "distrib-ray-x"
        nested.mkdir()
        assert not is_own_temp_dir(str(nested))  # not directly under the temp dir
        assert not is_own_temp_dir(None) and not is_own_temp_dir(["/tmp"]) and not is_own_temp_dir("relative")
    finally:
        shutil.rmtree(own, ignore_errors=True)
