"""The --resume allow-list, audited: every key it lets change leaves the trained weights identical.

One uninterrupted reference run and one run SIGKILLed mid-epoch are shared by the module; each case copies
the killed run, resumes it with one allow-listed key changed and compares the final weights with the
reference bit for bit. ``model.drop_rate`` makes training draw from the global torch RNG, so anything
that shifts that RNG between steps (a validation pass the other run did not make) shows up in the weights.
``data.num_workers`` is refused instead: the training order depends on it (config/changes.py says why).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env

# Folds 1+2 hold 130 samples: 9 steps/epoch at batch 16. Publishes at steps 3, 6 and 9 (the epoch-0
# validation); the kill hits the 3rd, so the surviving checkpoint is step 6, epoch 0, 6 batches in. The
# resumed run therefore redoes the end of epoch 0, its validation (or not) and all of epoch 1.
ARGS = [
    "launch/configs/experiments/debug.yaml",
    "model.name=test_resnet",
    "model.drop_rate=0.5",
    "train.epochs=2",
    "train.ckpt_every_steps=3",
    "train.latency_batches=1",
]
KILL_AT_PUBLISH = "3"


def _train(out, shards, tmp, extra=(), script=("launch/train.py",)):
    cmd = [PYTHON, *script, *ARGS, f"data.shards={shards}", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp), capture_output=True, text=True, timeout=600)


def _weights(run_dir):
    return torch.load(run_dir / "last_checkpoint" / "state.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory):
    """(shards, uninterrupted reference run dir, run dir killed mid-epoch 0)."""
    tmp = tmp_path_factory.mktemp("allowlist")
    ref = _train(tmp / "ref", demo_shards, tmp)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _train(tmp / "crashed", demo_shards, tmp, script=("tests/scripts/train_crash.py", KILL_AT_PUBLISH))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = torch.load(tmp / "crashed" / "last_checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 0 and state["pos"] == 6, state
    return demo_shards, tmp / "ref", tmp / "crashed"


def _resume_copy(runs, tmp_path, extra):
    shards, _, crashed = runs
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    return run, _train(run, shards, tmp_path, extra=[*extra, "--resume"])


def _classes_override(shards) -> str:
    """data.classes spelled as the index maps them (a check that passes), whatever names the shards use."""
    classes = json.loads((shards / "index.json").read_text())["classes"]
    return f"data.classes={{negative: {classes['0']}, positive: {classes['1']}}}"


# one case per reason in config/changes.py that claims the key does not change what is trained
CASES = {
    "name": ["name=renamed"],
    "ckpt_every_steps": ["train.ckpt_every_steps=2"],
    "log_every_steps": ["train.log_every_steps=1"],
    "eval_every_epochs": ["train.eval_every_epochs=2"],  # the resumed run skips epoch 0's validation
    "latency_batches": ["train.latency_batches=2"],
    "eval_batch_size": ["data.eval_batch_size=5"],
    "verify": ["data.verify=full"],
    "classes": [None],  # filled from the shards' index
    "max_skipped_fraction": ["train.max_skipped_fraction=0.5"],
    "trackers": ["train.trackers=[]"],
    "dist": ["dist.backend=gloo", "dist.timeout_s=60"],
    "later_stages": ["tune.folds=2", "embed.dim=8", "stack.n_estimators=10", "thresholds.bootstrap=10"],
    "eval": ["eval.group_agg=mean"],
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_resume_with_allowed_change_trains_the_same_weights(runs, tmp_path, case):
    extra = [_classes_override(runs[0]) if e is None else e for e in CASES[case]]
    run, resumed = _resume_copy(runs, tmp_path, extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch 0" in resumed.stdout and "allowed config changes" in resumed.stdout, resumed.stdout
    ref_w, res_w = _weights(runs[1]), _weights(run)
    assert ref_w.keys() == res_w.keys()
    differ = [k for k in ref_w if not torch.equal(ref_w[k], res_w[k])]
    assert not differ, f"{extra} on --resume changed the trained weights: {differ[:5]}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_with_other_num_workers_is_refused_before_training(runs, tmp_path):
    run, resumed = _resume_copy(runs, tmp_path, ["data.num_workers=2"])
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    err = resumed.stderr
    assert "data.num_workers: 0 -> 2" in err and "pass the original values" in err, err[-3000:]
    assert "Traceback" not in err
    state = torch.load(run / "last_checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 0 and state["pos"] == 6  # nothing trained, the checkpoint is untouched
