"""Resume guards: which config fields may change when a run or a sweep is continued.

A resumed run keeps the weights, optimizer state and data position of the checkpoint. If a field that
shaped those (data, fold, model, optimizer, schedule, augmentation, seed, loss, batch size) changed,
the run would be a mix of two experiments under one name, and ``config.yaml`` would describe neither.
So ``check_resume`` refuses every change except the fields listed here, and reports the allowed ones.

Public: ``RESUME_SAFE``, ``SWEEP_RESUME_SAFE``, ``EXTEND_RULE``, ``allowed_change``, ``config_changes``,
``check_resume``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from distrib.config.schema import SECTIONS, ExperimentConfig
from distrib.errors import ConfigError

# How a longer (or shorter) train.epochs / train.max_steps on --resume changes the lr schedule; written into
# resume_changes.json with the planned steps old -> new. A constant-lr run extended so equals the uninterrupted one.
EXTEND_RULE = "the schedule continues as if the run had been planned for the new length from the start"

# THE allow-list (one place). Everything not named here is refused on --resume. Why each is safe:
RESUME_SAFE = (
    "name",  # a label in reports; nothing trained depends on it
    "train.epochs",  # extends (or shortens) a run; steps already taken are unchanged. EXTEND_RULE: the schedule
    # continues as if the run had been planned for the new length from the start
    "train.max_steps",  # a stopping point, same reason and rule; a max_steps stop continues where it stopped
    "train.ckpt_every_steps",  # when checkpoints are written, not what they hold
    "train.log_every_steps",  # TensorBoard/progress cadence only
    "train.eval_every_epochs",  # when validation runs; it never touches the weights (nor the global RNG)
    "train.latency_batches",  # how long evaluation_results.json times the model
    "data.eval_batch_size",  # evaluation batching; metrics do not depend on it
    "data.verify",  # how the shards are checked before training, not which shards
    "data.classes",  # a check of the index's label mapping; the mapping itself is fixed by data.shards
    "train.max_skipped_fraction",  # when skipped corrupt samples fail the run; the data read is the same
    "train.trackers",  # where scalars are logged (a resumed run starts a new tracker run)
    "dist.",  # process-group backend and timeout: transport only
    # not data.num_workers: each (rank, worker) pair is its own shard chain and shuffle stream
    # (data/loader.py), so another worker count is another sample order, and a mid-epoch resume would
    # skip other batches than the ones trained. One order per rank dealt to the workers would have every
    # worker read (and, with corrupt-sample replacement, decode) the whole rank's stream.
    "tune.",  # sweep-level settings; a single run does not read them
    "embed.",  # later stages read these from the finished run
    "stack.",
    "thresholds.",
    "export.",  # deployment targets read by `distrib export`, after training
    "eval.",  # how finished predictions are aggregated into group metrics
)
# A sweep's trials must all train the same thing, and finished trials are not re-run on --resume, so a
# new train.epochs/max_steps would only reach the unfinished ones: narrower than RESUME_SAFE.
SWEEP_RESUME_SAFE = tuple(k for k in RESUME_SAFE if k not in ("train.epochs", "train.max_steps", "tune.")) + (
    "tune.max_concurrent",  # scheduling only
    "tune.max_failures",  # retries of a failing trial
    "tune.cpus_per_trial",  # resources, not results (a trial's thread count is not part of the science)
    "tune.gpus_per_trial",
    "tune.embed_best",  # post-sweep OOF extraction on/off
    "tune.fork_server",  # where a trial's imports happen, not what it computes
    "tune.ship_checkpoints",  # a second copy of each checkpoint in Ray's storage, not what is trained
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k in SECTIONS and not prefix:
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def _same_location(a: Any, b: Any) -> bool:
    """data.shards: a relative and an absolute spelling of one local directory are the same shards."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or not a or not b or "://" in a + b or "pipe:" in a + b:
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every field whose value differs between two config dicts."""
    fo, fn = _flatten(old), _flatten(new)
    # a field added after ``old`` was saved held its default then: absent-and-default is no change
    defaults = _flatten(dataclasses.asdict(ExperimentConfig()))
    changes = []
    for key in sorted(set(fo) | set(fn)):
        a, b = fo.get(key, defaults.get(key, "<unset>")), fn.get(key, defaults.get(key, "<unset>"))
        if a != b and not (key == "data.shards" and _same_location(a, b)):
            changes.append((key, a, b))
    return changes


def allowed_change(key: str, safe: tuple[str, ...]) -> bool:
    """Whether dotted ``key`` is in the allow-list ``safe`` (an entry ending in '.' allows its section)."""
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in safe)


def check_resume(old: dict, new: dict, where: str, fix: str, safe: tuple[str, ...] = RESUME_SAFE) -> list[dict]:
    """Raise ConfigError naming every changed field outside ``safe``; return the allowed changes.

    ``where`` names the saved config (the file the old values come from), ``fix`` the way out.
    """
    changes = config_changes(old, new)
    refused = [c for c in changes if not allowed_change(c[0], safe)]
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise ConfigError(
            f"--resume would change what was trained: {listed} (saved in {where}). A resumed run must keep these; {fix}"
        )
    return [{"key": k, "old": a, "new": b} for k, a, b in changes]


__all__ = ["EXTEND_RULE", "RESUME_SAFE", "SWEEP_RESUME_SAFE", "allowed_change", "config_changes", "check_resume"]
