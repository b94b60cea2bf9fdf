"""Resume: SIGKILL a single-process run mid-epoch, resume it, and get bit-identical weights and metrics."""

from __future__ import annotations

import csv
import json
import signal
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env

# Folds 1+2 (fold 0 validates) hold 130 samples: 9 steps/epoch at batch 16. Checkpoints are published at
# steps 3, 6, 9 (epoch end), 12, 15, ...; the kill hits the 5th publish (step 15), so the surviving
# checkpoint is step 12: epoch 1, 3 batches in, and steps 13-15 are lost and must be redone identically.
# timm's test_resnet (0.37 M params) instead of debug.yaml's resnet18: the kill is hooked to a publish, not timed,
# so a smaller model tests the same resume path, faster and with 6 MB run dirs instead of 170 MB
ARGS = [
    "launch/configs/experiments/debug.yaml",
    "model.name=test_resnet",
    "train.epochs=2",
    "train.ckpt_every_steps=3",
    "train.latency_batches=1",
]


def _train(out, shards, tmp, extra=(), script=("launch/train.py",)):
    cmd = [PYTHON, *script, *ARGS, f"data.shards={shards}", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp), capture_output=True, text=True, timeout=600)


def _weights(run_dir):
    state = torch.load(run_dir / "last_checkpoint" / "state.pt", map_location="cpu", weights_only=True)
    return state["model"]


# augment.device=model: the augmentation runs in the step, seeded per (seed, epoch, rank, batch), not in the loader
ON_MODEL = [
    "augment.device=model",
    "augment.rotate=30",
    "augment.motion_blur_p=0.5",
    "augment.color_jitter=[0.2,0.2,0.2,0.02]",
]


# the same with 2 DataLoader workers: batches come through the shared-memory ring (data/ring.py)
ON_MODEL_RING = [*ON_MODEL, "data.num_workers=2"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "aug", [[], ON_MODEL, ON_MODEL_RING], ids=["augment_on_loader", "augment_on_model", "augment_on_model_ring"]
)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(demo_shards, tmp_path, aug):
    ref = _train(tmp_path / "ref", demo_shards, tmp_path, extra=aug)
    assert ref.returncode == 0, ref.stderr[-3000:]

    crashed = tmp_path / "crashed"
    killed = _train(crashed, demo_shards, tmp_path, extra=aug, script=("tests/scripts/train_crash.py", "5"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # the interrupted publish left its temp dir; the previous checkpoint is complete and mid-epoch
    state = torch.load(crashed / "last_checkpoint" / "trainer_state.pt", weights_only=True)
    assert (crashed / "last_checkpoint.tmp").is_dir()
    assert state["epoch"] == 1 and 0 < state["pos"] < 9, state

    no_flag = _train(crashed, demo_shards, tmp_path, extra=aug)
    assert no_flag.returncode == 2 and "--resume" in no_flag.stderr

    resumed = _train(crashed, demo_shards, tmp_path, extra=[*aug, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch 1" in resumed.stdout

    ref_w, res_w = _weights(tmp_path / "ref"), _weights(crashed)
    assert ref_w.keys() == res_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], res_w[k]), k

    def log_rows(path):  # every column but the wall-clock one
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path))]

    ref_log, res_log = log_rows(tmp_path / "ref" / "training_log.csv"), log_rows(crashed / "training_log.csv")
    assert ref_log and ref_log == res_log
    ref_best = torch.load(tmp_path / "ref" / "best_model.pth", weights_only=True)["metrics"]
    res_best = torch.load(crashed / "best_model.pth", weights_only=True)["metrics"]
    assert ref_best == res_best
    ref_eval = json.loads((tmp_path / "ref" / "evaluation_results.json").read_text())
    res_eval = json.loads((crashed / "evaluation_results.json").read_text())
    assert ref_eval["metrics_at_0.5"] == res_eval["metrics_at_0.5"]
    assert (tmp_path / "ref" / "val_predictions.csv").read_text() == (crashed / "val_predictions.csv").read_text()
