"""Issue 27.1, 27.2, 27.4: outputs never clobber inputs, one writer per output folder, clear full-disk and
corrupt-checkpoint errors. Real `distrib` subprocesses, real flock between processes, a real tmpfs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env
from distrib.cli.commands import strict_json
from distrib.errors import DistribError
from distrib.runlock import LOCK_NAME, lock_output, release_all

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"


def _distrib(*args, tmp: Path, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "distrib", *map(str, args)],
        cwd=REPO,
        env=subprocess_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_predict_and_export_refuse_to_overwrite_their_inputs(tmp_path):
    run, images = tmp_path / "run", tmp_path / "images"
    run.mkdir()
    images.mkdir()
    (run / "best_model.pth").write_bytes(b"model bytes")
    (images / "a.jpg").write_bytes(b"jpeg bytes")
    (tmp_path / "link.pth").symlink_to(run / "best_model.pth")
    cases = [
        ("predict", "--model", run, "--images", images, "--out", images / "a.jpg"),
        ("predict", "--model", run, "--images", images, "--out", run / "best_model.pth"),
        ("export", run, "--out", run / "best_model.pth"),
        ("export", run, "--out", tmp_path / "link.pth"),  # a symlink to the checkpoint is the checkpoint
        ("export", run, "--out", f"{images}/../run/best_model.pth"),
    ]
    for args in cases:
        r = _distrib(*args, tmp=tmp_path)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and ("inputs" in r.stderr or "folder this command reads" in r.stderr)
    assert (run / "best_model.pth").read_bytes() == b"model bytes"
    assert (images / "a.jpg").read_bytes() == b"jpeg bytes"


def test_an_existing_output_file_is_replaced_and_said(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    pred = tmp_path / "val_predictions.csv"
    pd.DataFrame({"label": y, "prob": np.clip(y * 0.6 + rng.random(200) * 0.5, 0, 1), "split": "val"}).to_csv(
        pred, index=False
    )
    first = _distrib("thresholds", "--pred", pred, "--out", tmp_path / "th", "thresholds.fit_split=val", tmp=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "replaced" not in first.stderr
    second = _distrib("thresholds", "--pred", pred, "--out", tmp_path / "th", "thresholds.fit_split=val", tmp=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"replaced {(tmp_path / 'th' / 'thresholds.json').resolve()}" in second.stderr
    assert json.loads((tmp_path / "th" / "thresholds.json").read_text())["band"]


def test_a_second_writer_fails_fast_naming_the_first_and_sigkill_frees_the_lock(demo_shards, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        DEBUG,
        "--out",
        out,
        f"data.shards={demo_shards}",
        "train.epochs=200",
        "data.samples_per_epoch=32",
        "train.latency_batches=1",
    ]
    holder = subprocess.Popen(
        [PYTHON, "-m", "distrib", *map(str, args)],
        cwd=REPO,
        env=subprocess_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not ((out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text().startswith(str(holder.pid))):
            assert holder.poll() is None, holder.stderr.read()[-3000:]
            assert time.time() < deadline, "the first train never took the lock"
            time.sleep(0.2)
        t0 = time.time()
        second = _distrib(*args, tmp=tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        assert time.time() - t0 < 60
        assert f"PID {holder.pid}" in second.stderr and "distrib train" in second.stderr
        assert "Traceback" not in second.stderr
        assert holder.poll() is None  # the first run goes on
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        holder.stderr.close()
    lock_output(out, "pytest")  # the kernel released the dead holder's lock
    assert (out / LOCK_NAME).read_text().startswith(f"{os.getpid()} pytest")
    release_all()


def test_lock_refuses_a_second_process_on_a_shard_folder(tmp_path):
    # two concurrent `distrib shard` into one --out: the second fails at once instead of a traceback
    holder = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import sys, time; from distrib.runlock import lock_output; "
            f"lock_output({str(tmp_path / 'shards')!r}, 'distrib shard --out x'); print('held', flush=True); "
            "time.sleep(60)",
        ],
        env=subprocess_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        manifest = tmp_path / "train.csv"
        manifest.write_text("path,label\nnope.jpg,0\n")
        r = _distrib("shard", "--train", manifest, "--out", tmp_path / "shards", tmp=tmp_path)
        assert r.returncode == 2 and f"PID {holder.pid}: distrib shard --out x" in r.stderr, r.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


@pytest.mark.parametrize(
    "payload",
    [None, b"\x80\x04\x95garbage", "malicious"],
    ids=["truncated", "garbage", "malicious"],
)
def test_corrupt_checkpoint_is_one_line_not_a_traceback(tmp_path, payload):
    from distrib.training.checkpoint import saved_state

    ckpt = tmp_path / "last_checkpoint"
    ckpt.mkdir()
    if payload == "malicious":  # a pickle that would run os.system if loaded without weights_only

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch " + str(tmp_path / "pwned"),))

        torch.save({"x": Evil()}, ckpt / "trainer_state.pt")
    else:
        good = tmp_path / "good.pt"
        torch.save({"epoch": 1, "step": 2, "w": torch.zeros(1000)}, good)
        data = good.read_bytes()
        (ckpt / "trainer_state.pt").write_bytes(payload or data[: len(data) // 2])
    with pytest.raises(DistribError, match="not a checkpoint this version wrote") as e:
        saved_state(ckpt)
    assert str(ckpt / "trainer_state.pt") in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_stdout_json_has_no_bare_nan():
    line = strict_json({"metrics": {"auc": float("nan"), "f1": np.float32(0.5)}, "n": np.int64(3)})
    obj = json.loads(line)
    assert obj["metrics"]["auc"] is None and "one class" in obj["metrics"]["auc_reason"]
    assert "NaN" not in line and obj["n"] == 3


def test_full_disk_while_saving_keeps_the_old_file_and_names_it(tiny_tmpfs):
    from distrib.cli import _disk_full
    from distrib.training.checkpoint import save_best

    best = tiny_tmpfs / "run" / "best_model.pth"
    save_best(best, {"w": torch.zeros(10)}, {}, {})
    before = best.read_bytes()
    with pytest.raises(OSError) as e:
        save_best(best, {"w": torch.zeros(4 * 1024 * 1024)}, {}, {})  # 16 MiB on an 8 MiB disk
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(best) and "bytes written" in e.value.strerror
    assert best.read_bytes() == before and not [p for p in best.parent.iterdir() if p.name != best.name]
    import argparse

    msg = _disk_full(argparse.Namespace(command="export", out=str(best.parent)), e.value)
    assert str(best) in msg and "bytes written" in msg and "bytes free" in msg and "intact" in msg
    shutil.rmtree(best.parent)
