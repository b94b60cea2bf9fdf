"""--resume with a larger train.epochs or train.max_steps trains the new steps (issue 27.6).

The schedule continues as if the run had been planned for the new length from the start
(config.changes.EXTEND_RULE), so a constant-lr run extended equals the uninterrupted run of the full
length, bit for bit on CPU; a cosine run's extra epoch trains at a nonzero lr.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import REPO
from distrib.config import load_config
from distrib.config.changes import EXTEND_RULE

DEBUG = REPO / "launch" / "configs" / "experiments" / "debug.yaml"
# Folds 1+2 (fold 0 validates) hold 130 samples: 9 steps per epoch at batch 16.
STEPS_PER_EPOCH = 9


def _train(shards, out, *overrides, resume=False) -> dict:
    from distrib.training.trainer import run

    cfg = load_config(DEBUG, [f"data.shards={shards}", "train.latency_batches=1", "data.num_workers=0", *overrides])
    return run(cfg, out, resume=resume)


def _weights(run_dir) -> dict:
    state = torch.load(run_dir / "last_checkpoint" / "state.pt", map_location="cpu", weights_only=True)
    return state["model"]


def _trainable(run_dir) -> dict:
    """The checkpoint's trainable tensors (BatchNorm running stats move even at lr 0, so they are left out)."""
    from distrib.runs import load_run

    model, _, _ = load_run(run_dir)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in _weights(run_dir).items() if k in names}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.timeout(600)
def test_cosine_epochs_extension_trains_the_new_epoch(demo_shards, tmp_path):
    out = tmp_path / "run"
    first = _train(demo_shards, out, "train.epochs=1", "optim.scheduler=cosine")
    assert first["steps"] == STEPS_PER_EPOCH
    before = _trainable(out)

    second = _train(demo_shards, out, "train.epochs=2", "optim.scheduler=cosine", resume=True)
    assert second["steps"] == 2 * STEPS_PER_EPOCH
    after = _trainable(out)
    assert before.keys() == after.keys() and before
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"weights the extra epoch did not train: {unchanged}"

    # the extra epoch ran at the 2-epoch cosine's lr (half-way: lr/2 at step 9), not the 1-epoch plan's 0
    rows = list(csv.DictReader(open(out / "training_log.csv")))
    assert [int(r["step"]) for r in rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    entry = json.loads((out / "resume_changes.json").read_text())[-1]
    assert entry["changes"] == [{"key": "train.epochs", "old": 1, "new": 2}]
    assert entry["schedule"] == {
        "rule": EXTEND_RULE,
        "planned_steps": {"old": STEPS_PER_EPOCH, "new": 2 * STEPS_PER_EPOCH},
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "short, full",
    [(["train.epochs=1"], ["train.epochs=2"]), (["train.max_steps=3"], ["train.max_steps=12"])],
    ids=["epochs_1_to_2", "max_steps_3_to_12"],
)
def test_constant_lr_extension_equals_uninterrupted_run(demo_shards, tmp_path, short, full):
    const = ["optim.scheduler=none", "train.epochs=2"]
    ref = _train(demo_shards, tmp_path / "ref", *const, *full)

    out = tmp_path / "extended"
    stopped = _train(demo_shards, out, *const, *short)
    resumed = _train(demo_shards, out, *const, *full, resume=True)
    assert stopped["steps"] < resumed["steps"] == ref["steps"]
    _assert_equal(_weights(tmp_path / "ref"), _weights(out))  # BatchNorm running stats included
    ref_opt = torch.load(tmp_path / "ref" / "last_checkpoint" / "state.pt", weights_only=True)["optimizer"]
    ext_opt = torch.load(out / "last_checkpoint" / "state.pt", weights_only=True)["optimizer"]
    assert [g["lr"] for g in ref_opt["param_groups"]] == [g["lr"] for g in ext_opt["param_groups"]]
    entry = json.loads((out / "resume_changes.json").read_text())[-1]
    assert entry["schedule"]["rule"] == EXTEND_RULE
    assert entry["schedule"]["planned_steps"] == {"old": stopped["steps"], "new": ref["steps"]}
    again = _train(demo_shards, out, *const, *full, resume=True)  # a finished run resumed: nothing left to train
    assert again["steps"] == ref["steps"]
    _assert_equal(_weights(tmp_path / "ref"), _weights(out))
