"""Issue 15, run side: resume guards, a loopback-only local Ray that cleans up after itself, exit codes.

Real components throughout: real `distrib train` runs on the debug config and the demo shards, real
`distrib tune` drivers that start their own local Ray cluster, real signals (SIGINT, SIGKILL).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import PYTHON, REPO, subprocess_env
from distrib.config import RESUME_SAFE, SWEEP_RESUME_SAFE, ConfigError, check_resume, config_to_dict, load_config
from distrib.sweep.local_ray import PID_FILE, listening_sockets

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
SHORT = ["data.samples_per_epoch=32", "train.latency_batches=1"]  # 2 steps per epoch


def _distrib(*args, tmp: Path, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "distrib", *map(str, args)],
        cwd=REPO,
        env={**subprocess_env(tmp), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _popen(*args, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "distrib", *map(str, args)],
        cwd=REPO,
        env=subprocess_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:  # gRPC's ::ffff:127.0.0.1
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _alive(recs: list[dict]) -> list[dict]:
    out = []
    for r in recs:
        try:
            p = psutil.Process(r["pid"])
            if abs(p.create_time() - r["create_time"]) < 0.05 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(r)
        except psutil.NoSuchProcess:
            pass
    return out


# ----------------------------------------------------------------------------- 1. resume guards


def test_allow_list_refuses_what_was_trained_and_lists_safe_changes(demo_shards):
    old = config_to_dict(load_config(DEBUG, [f"data.shards={demo_shards}"]))
    changed = config_to_dict(
        load_config(
            DEBUG,
            [f"data.shards={demo_shards}", "data.fold=1", "optim.lr=0.01", "train.epochs=5", "data.eval_batch_size=8"],
        )
    )
    with pytest.raises(ConfigError, match=r"data\.fold: 0 -> 1; optim\.lr: 0\.001 -> 0\.01 \(saved in X\).*FIX"):
        check_resume(old, changed, "X", "FIX")
    for key in (
        "augment.hflip=0.0",
        "train.seed=1",
        "data.batch_size=8",
        "model.name=efficientnet_b0",
        "train.grad_accum=2",
        "train.label_smoothing=0.1",
        "optim.scheduler=none",
        "data.seed=3",
        "data.num_workers=2",  # each worker is its own sample stream: another count, another order
    ):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            check_resume(old, config_to_dict(load_config(DEBUG, [f"data.shards={demo_shards}", key])), "X", "F")
    safe = config_to_dict(
        load_config(
            DEBUG,
            [
                f"data.shards={demo_shards}",
                "train.epochs=5",
                "data.eval_batch_size=8",
                "train.log_every_steps=7",
                "tune.max_concurrent=1",
            ],
        )
    )
    assert [c["key"] for c in check_resume(old, safe, "X", "F")] == [
        "data.eval_batch_size",
        "train.epochs",
        "train.log_every_steps",
        "tune.max_concurrent",
    ]
    # the same shard dir spelled relative to the cwd is not a change
    rel = os.path.relpath(demo_shards)
    assert check_resume(old, config_to_dict(load_config(DEBUG, [f"data.shards={rel}"])), "X", "F") == []
    # a sweep's trials must all train alike: extending epochs is refused on tune --resume
    with pytest.raises(ConfigError, match=r"train\.epochs: 2 -> 5"):
        check_resume(old, safe, "X", "F", safe=SWEEP_RESUME_SAFE)
    assert "train.epochs" in RESUME_SAFE and "data.fold" not in RESUME_SAFE


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_resume_refuses_changed_fold_and_lr_and_logs_allowed_changes(demo_shards, tmp_path):
    out = tmp_path / "run"
    args = [DEBUG, f"data.shards={demo_shards}", *SHORT, "train.epochs=1", "--out", out]
    first = _distrib("train", *args, tmp=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    config_before = (out / "config.yaml").read_text()
    protocol_before = (out / "fold_protocol.json").read_text()

    refused = _distrib("train", *args, "data.fold=1", "optim.lr=0.01", "--resume", tmp=tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "data.fold: 0 -> 1; optim.lr: 0.001 -> 0.01" in refused.stderr and "Traceback" not in refused.stderr
    assert (out / "config.yaml").read_text() == config_before  # nothing rewritten
    assert (out / "fold_protocol.json").read_text() == protocol_before

    (out / "last_checkpoint.tmp").mkdir()  # 5. as a SIGKILL mid-publish leaves it
    (out / "last_checkpoint.tmp" / "state.pt").write_bytes(b"partial")
    extended = _distrib("train", *args, "train.epochs=2", "train.log_every_steps=1", "--resume", tmp=tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "resumed at epoch 1 step 2" in extended.stdout
    assert "allowed config changes from step 2: train.epochs: 1 -> 2" in extended.stdout
    log = json.loads((out / "resume_changes.json").read_text())
    assert log[0]["step"] == 2 and {c["key"]: (c["old"], c["new"]) for c in log[0]["changes"]} == {
        "train.epochs": (1, 2),
        "train.log_every_steps": (2, 1),
    }
    assert load_config(out / "config.yaml").train.epochs == 2  # config.yaml now says what the run is
    assert not (out / "last_checkpoint.tmp").exists()


def test_tune_resume_compares_config_and_grid(demo_shards, tmp_path):
    """`distrib tune --resume` used to ignore a new config; now it is checked before Ray starts."""
    from distrib.sweep.driver import _check_resume, _prepare, run_sweep

    grid = {"optim.lr": [1e-3]}
    base = [f"data.shards={demo_shards}", *SHORT]
    _prepare(load_config(DEBUG, base), grid, tmp_path)
    with pytest.raises(ConfigError, match=r"optim\.weight_decay: 0\.0001 -> 0\.5; train\.epochs: 2 -> 3"):
        run_sweep(
            load_config(DEBUG, [*base, "train.epochs=3", "optim.weight_decay=0.5"]),
            grid,
            tmp_path,
            resume=True,
            address="127.0.0.1:1",
        )
    with pytest.raises(ConfigError, match=r"sweep grid from \{'optim.lr': \[0.001\]\}"):
        run_sweep(load_config(DEBUG, base), {"optim.lr": [3e-3]}, tmp_path, resume=True, address="127.0.0.1:1")
    assert not (tmp_path / "resume_changes.json").exists()
    _check_resume(load_config(DEBUG, [*base, "tune.max_concurrent=1"]), grid, tmp_path)  # scheduling only
    assert json.loads((tmp_path / "resume_changes.json").read_text())[0]["changes"] == [
        {"key": "tune.max_concurrent", "old": 0, "new": 1}
    ]
    assert load_config(tmp_path / "config.yaml").tune.max_concurrent == 1


# ------------------------------------------------------------------------------- 4. Ctrl-C in train


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_in_train_prints_checkpoint_and_resume_command(demo_shards, tmp_path):
    out = tmp_path / "run"
    proc = _popen(
        "train",
        DEBUG,
        f"data.shards={demo_shards}",
        *SHORT,
        "train.epochs=30",  # 60 steps: the SIGINT lands mid-run even when this process is starved
        "train.ckpt_every_steps=1",
        "data.img_size=96",  # 9x the pixels of debug.yaml's 32: slower steps, and checkpoints stay ~1.5 MB
        "--out",
        out,
        tmp=tmp_path,
    )
    _wait_for(lambda: (out / "last_checkpoint" / "trainer_state.pt").is_file(), proc, 600, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert f"The last checkpoint is {out / 'last_checkpoint'}" in stderr, stderr[-2000:]
    command = stderr.split("continue with: ")[1].splitlines()[0]
    words = shlex.split(command)
    assert words[:2] == ["distrib", "train"] and words[-1] == "--resume" and "train.epochs=30" in words
    resumed = _distrib(*words[1:], tmp=tmp_path)  # the printed command, run as printed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stdout and not (out / "resume_changes.json").exists()


# ------------------------------------------------------------------ 2, 3, 6. the sweep's own local Ray


def _sweep_args(shards: Path, tmp: Path) -> list:
    (tmp / "grid.yaml").write_text("optim.lr: [1.0e-3]\n")
    return [
        DEBUG,
        f"data.shards={shards}",
        *SHORT,
        "train.epochs=1",
        "tune.embed_best=false",
        "tune.max_concurrent=1",
        "--grid",
        tmp / "grid.yaml",
        "--out",
        tmp / "sweep",
        "--num-cpus",
        "1",
    ]


def _pid_record(sweep: Path, driver: int):
    path = sweep / PID_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data["driver"] == driver and data["procs"] else None


def _start_sweep(shards: Path, tmp: Path, args: list | None = None) -> tuple[subprocess.Popen, Path, dict]:
    """`distrib tune` with its own local cluster, returned once its PID file is written and a trial runs."""
    sweep = tmp / "sweep"
    proc = _popen("tune", *(args or _sweep_args(shards, tmp)), tmp=tmp)
    record = _wait_for(lambda: _pid_record(sweep, proc.pid), proc, 300, "the Ray PID file")
    _wait_for(lambda: (sweep / "trials" / "c0_fold0" / "trial_events.log").is_file(), proc, 300, "a trial")
    return proc, sweep, record


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_ray_is_loopback_only_and_sigint_exits_130_and_cleans_up(demo_shards, tmp_path):
    proc, sweep, record = _start_sweep(demo_shards, tmp_path)
    cluster = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    cluster += [psutil.Process(r["pid"]) for r in _alive(record["procs"]) if r["pid"] not in {p.pid for p in cluster}]
    listeners = listening_sockets(cluster)
    print("Ray listeners:", listeners)
    names = {n for n, _, _ in listeners}
    assert listeners and {"gcs_server", "raylet"} <= names, listeners
    assert all(_is_loopback(ip) for _, ip, _ in listeners), [x for x in listeners if not _is_loopback(x[1])]
    temp_dir = Path(record["temp_dir"])
    assert temp_dir.is_dir() and sweep not in temp_dir.parents  # 6. not in the sweep dir
    assert not list(sweep.glob("ray*/")) or [p.name for p in sweep.glob("ray*/")] == ["ray_results"]

    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]  # 3. not 0 with "best": null
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "interrupted"
    assert "Traceback" not in stderr, stderr[-3000:]
    command = stderr.split("continue with: ")[1].splitlines()[0]
    assert shlex.split(command)[:2] == ["distrib", "tune"] and command.endswith("--resume")
    assert f"--out {sweep}" in command and "--grid" in command
    time.sleep(1)
    assert _alive(record["procs"]) == [], _alive(record["procs"])  # the cluster it started is gone
    assert not temp_dir.exists() and not (sweep / PID_FILE).exists()
    assert [p.name for p in sweep.iterdir() if p.name.startswith("ray")] == ["ray_results"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_next_tune_stops_orphans_of_a_sigkilled_driver_and_stale_checkpoint_tmps(demo_shards, tmp_path):
    args = _sweep_args(demo_shards, tmp_path)
    proc, sweep, record = _start_sweep(demo_shards, tmp_path, args)
    trial = sweep / "trials" / "c0_fold0"
    proc.kill()
    proc.communicate()
    time.sleep(3)
    orphans = _alive(record["procs"])
    print("orphans after SIGKILL:", [r["name"] for r in orphans])
    assert orphans, "Ray's agents outlive a SIGKILLed driver by ~60 s; this test needs them alive"
    (trial / "last_checkpoint.tmp").mkdir(parents=True, exist_ok=True)  # 5. a killed checkpoint write

    # the next `distrib tune` on that dir stops them first, even though it then refuses a changed config
    refused = _distrib("tune", *args, "optim.weight_decay=0.5", "--resume", tmp=tmp_path)
    assert refused.returncode == 2 and "optim.weight_decay: 0.0001 -> 0.5" in refused.stderr, refused.stderr[-3000:]
    assert _alive(orphans) == [], _alive(orphans)
    stopped_line = next(line for line in refused.stderr.splitlines() if "left by the killed sweep driver" in line)
    assert all(str(r["pid"]) in stopped_line for r in orphans), (stopped_line, orphans)  # by us, by PID

    resumed = _distrib("tune", *args, "--resume", tmp=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["status"] == "done"
    assert not list(sweep.glob("trials/*/last_checkpoint.tmp"))
    assert [p.name for p in sweep.iterdir() if p.name.startswith("ray")] == ["ray_results"]
    assert yaml.safe_load((sweep / "grid.yaml").read_text()) == {"optim.lr": [1e-3]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_the_sweep_and_its_cluster_with_exit_143(demo_shards, tmp_path):
    proc, sweep, record = _start_sweep(demo_shards, tmp_path)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "continue with: distrib tune" in stderr, stderr[-3000:]
    time.sleep(1)
    assert _alive(record["procs"]) == [] and not Path(record["temp_dir"]).exists()
    assert not (sweep / PID_FILE).exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_with_a_trial_that_failed_for_good_exits_1(demo_shards, tmp_path):
    """Decided (README): failed trials make the sweep exit 1, so `tune && stack` stops; outputs are written."""
    from distrib.sweep.trial import FAIL_ONCE_ENV

    res = _distrib(
        "tune",
        *_sweep_args(demo_shards, tmp_path),
        "tune.max_failures=0",
        "tune.fork_server=false",
        tmp=tmp_path,
        env={FAIL_ONCE_ENV: str(tmp_path / "fail_once.marker")},
    )
    assert res.returncode == 1, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["status"] == "incomplete" and result["done"] == 2 and result["best"] is None, result
    assert "1 of 3 trials failed" in res.stderr and "no best config" in res.stderr, res.stderr[-3000:]
    assert res.stderr.rstrip().endswith("--resume")  # the last line: how to retry the failed trial
    assert (tmp_path / "sweep" / "sweep_summary.csv").is_file()
    done = [json.loads(p.read_text()) for p in (tmp_path / "sweep" / "trials").glob("*/trial_result.json")]
    assert [(t["fork_server"], t["torch_threads"]) for t in done] == [(False, 1)] * 2, done  # imported in-process


def test_tune_with_missing_hub_weights_fails_before_ray_starts(demo_shards, tmp_path):
    """Offline with an empty hub cache, `distrib tune ... model.pretrained=true` used to start Ray and fail every
    trial on the hub error (a new user met 12 failed trials and a --resume hint); now the driver builds each of
    the grid's models once before anything is written or started, as `distrib run` does."""
    hf = tmp_path / "empty_hf"
    res = _distrib(
        "tune",
        *_sweep_args(demo_shards, tmp_path),
        "model.pretrained=true",
        tmp=tmp_path,
        env={"HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "could not load timm's pretrained weights" in res.stderr and "model.pretrained_file" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "sweep").exists()  # no config.yaml, no Ray PID file


def test_a_field_added_after_a_checkpoint_at_its_default_is_no_change():
    from distrib.config import config_changes, config_to_dict, load_config

    new = config_to_dict(load_config(None))
    old = {k: (dict(v) if isinstance(v, dict) else v) for k, v in new.items()}
    del old["export"], old["train"]["max_skipped_fraction"]  # as saved by an older distrib
    assert config_changes(old, new) == []
    new["train"]["max_skipped_fraction"] = 0.5
    assert [c[0] for c in config_changes(old, new)] == ["train.max_skipped_fraction"]
