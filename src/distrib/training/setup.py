"""Builds everything the training loop touches (``Trainer``) and restores it from a checkpoint.

Kept apart from the loop (``trainer.py``) so the loop stays one screen. ``preflight`` runs before the process group
starts and turns bad shards, folds, model names, teacher runs and precision settings into clear
errors on every rank at once, instead of one rank failing inside a collective.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from distrib.atomic import writable_dir, write_json
from distrib.config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    check_resume,
    config_to_dict,
    read_yaml_mapping,
    save_config,
)
from distrib.config.changes import EXTEND_RULE
from distrib.errors import DataError, DistribError
from distrib.extras import require
from distrib.runs import find_checkpoint, load_run
from distrib.training import dist
from distrib.training.checkpoint import load_checkpoint, remove_stale_tmp, saved_state
from distrib.training.runlog import RunLogger, check_trackers
from distrib.training.state import Trainer

log = logging.getLogger(__name__)
RESUME_CHANGES = "resume_changes.json"  # every --resume's allowed config changes, appended (the run's log of them)


def preflight(cfg: ExperimentConfig, out: Path, resume: bool) -> torch.nn.Module:
    """Validate data, output dir, teacher and precision; return the freshly seeded, built model."""
    from accelerate.utils import set_seed

    from distrib.data.index import read_index
    from distrib.data.loader import folds_for
    from distrib.data.verify import check_classes, verify_shards
    from distrib.models import build_model

    if dist.using_deepspeed():  # accelerate imports both when the Accelerator is built, after the group is up
        require("deepspeed", "transformers", extra="deepspeed", feature="an accelerate DeepSpeed config")
    if not cfg.data.shards:
        raise ConfigError(
            "data.shards is empty; pass the shard directory, e.g. data.shards=shards/ (written by 'distrib shard')"
        )
    index = read_index(cfg.data.shards)
    folds_for(cfg.data.fold, int(index["folds"]))  # raises DataError naming the valid folds
    verify_shards(index, cfg.data.verify)  # every indexed shard exists; sha256 or size + tar header
    check_classes(index, cfg.data.classes)
    classes = index.get("classes") or {}
    if classes and len(classes) != 2:  # both head types (1 BCE logit, 2 CE logits) are binary
        raise DataError(
            f"{cfg.data.shards}/index.json has {len(classes)} classes {sorted(classes.values())}, but "
            f"model.num_classes={cfg.model.num_classes} trains a binary classifier; fix the manifest's "
            "labels (a stray label?) and re-shard with 'distrib shard --overwrite'"
        )
    if not resume and find_checkpoint(out) is not None:
        raise DistribError(
            f"{out} already holds a training checkpoint; pass --resume to continue it or choose a new --out directory"
        )
    if resume and find_checkpoint(out) is not None:
        check_resume_config(cfg, out)
    teacher = cfg.train.distill_teacher
    if teacher and not (Path(teacher) / "best_model.pth").is_file():
        raise ConfigError(
            f"train.distill_teacher={teacher!r} has no best_model.pth; point it at a finished "
            "run directory (e.g. the DINOv2 probe run)"
        )
    check_trackers(cfg.train.trackers)
    from distrib.data.transforms import augment_placement

    augment_placement(cfg.augment, cfg.data, "cuda" if torch.cuda.is_available() else "cpu")  # decode_device check
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    dist.check_precision(cfg, model)
    dry_forward(cfg, model)
    writable_dir(out, "--out")  # only once everything else passed: a failed check leaves no empty run dir
    return model


def planned_steps(epochs: int, max_steps: int, steps_per_epoch: int) -> int:
    """The optimizer steps a run is planned for: its epochs, cut at train.max_steps when that is set."""
    total = epochs * steps_per_epoch
    return min(total, max_steps or total)


def check_resume_config(
    cfg: ExperimentConfig, out: Path, record: bool = False, steps_per_epoch: int | None = None
) -> list[dict]:
    """Refuse a --resume whose config changes what the checkpoint trained; return the allowed changes.

    The old config is the one stored in the checkpoint (older checkpoints: the run dir's config.yaml).
    With ``record`` (rank 0, in ``build_trainer``) allowed changes (config.changes.RESUME_SAFE) are
    printed and appended to ``resume_changes.json``, with the re-planned schedule (planned steps old ->
    new, ``EXTEND_RULE``) when train.epochs or train.max_steps changed; ``build_trainer`` then rewrites
    config.yaml.
    """
    ckpt = find_checkpoint(out)
    state = saved_state(ckpt)
    where = f"{ckpt}/trainer_state.pt"
    old = state.get("config")
    if old is None:
        if not (out / "config.yaml").is_file():
            raise DistribError(
                f"--resume: {out} has a checkpoint but no config.yaml to check the new config "
                "against; restore config.yaml from the original run or start a new --out"
            )
        old, where = read_yaml_mapping(out / "config.yaml"), str(out / "config.yaml")
    changes = check_resume(
        config_to_dict(build_config(old)),
        config_to_dict(cfg),
        where,
        f"pass the original values (e.g. 'distrib train {out / 'config.yaml'} --out {out} "
        "--resume') or train the new settings into a new --out directory",
    )
    if changes and record:
        text = ", ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in changes)
        dist.print0(
            f"--resume: allowed config changes from step {state['step']}: {text} (logged in {out / RESUME_CHANGES})"
        )
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "step": state["step"],
            "epoch": state["epoch"],
            "changes": changes,
        }
        old_value = {c["key"]: c["old"] for c in changes}
        if steps_per_epoch and {"train.epochs", "train.max_steps"} & set(old_value):
            old_epochs = old_value.get("train.epochs", cfg.train.epochs)
            old_max_steps = old_value.get("train.max_steps", cfg.train.max_steps)
            entry["schedule"] = {
                "rule": EXTEND_RULE,
                "planned_steps": {
                    "old": planned_steps(old_epochs, old_max_steps, steps_per_epoch),
                    "new": planned_steps(cfg.train.epochs, cfg.train.max_steps, steps_per_epoch),
                },
            }
        _append_changes(out / RESUME_CHANGES, entry)
        if "schedule" in entry:
            plan = entry["schedule"]["planned_steps"]
            dist.print0(f"--resume: lr schedule re-planned for {plan['old']} -> {plan['new']} steps: {EXTEND_RULE}")
    return changes


def _append_changes(path: Path, entry: dict) -> None:
    import json

    entries = json.loads(path.read_text()) if path.is_file() else []
    write_json(path, [*entries, entry], indent=1)


def dry_forward(cfg: ExperimentConfig, model: torch.nn.Module) -> None:
    """One batch-1 forward at data.img_size, so a size mismatch fails here and not inside a collective."""
    size = cfg.data.img_size
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except DistribError:
        raise
    except Exception as e:  # shape errors from deep inside a backbone: say which settings to change
        raise ConfigError(
            f"model {cfg.model.name!r} cannot take a {size}x{size} input (data.img_size={size}, "
            f"model.img_size={cfg.model.img_size}): {e}; change data.img_size or model.img_size"
        ) from e
    finally:
        model.train()


def check_models(cfgs) -> list[str]:
    """Build each distinct (model section, data.img_size) of ``cfgs`` once and run one batch-1 forward.

    A size the model cannot take (e.g. GenConViT built for 224 px fed 64 px) or a missing hub weight
    (offline, empty cache) fails with its clear error before any file, process group or Ray trial exists,
    not minutes in when a trial starts; online, ``model.pretrained`` weights land in the Hugging Face cache
    once instead of in every trial at the same time. ``None`` entries are skipped; returns the names built."""
    from distrib.models import build_model

    names, seen = [], set()
    for cfg in cfgs:
        key = cfg and (repr(cfg.model), cfg.data.img_size)
        if key and key not in seen:
            seen.add(key)
            dry_forward(cfg, build_model(cfg.model))
            names.append(cfg.model.name)
    return names


def _mean_std(cfg: ExperimentConfig, model: torch.nn.Module):
    from distrib.data.transforms import resolve_mean_std

    if cfg.data.normalize != "model":
        return resolve_mean_std(cfg.data)
    try:
        return resolve_mean_std(cfg.data, cfg.model.name)
    except Exception:  # registered (non-timm) names have no pretrained_cfg: read it from the module
        return resolve_mean_std(cfg.data, model)


def _load_teacher(cfg: ExperimentConfig, device) -> tuple[torch.nn.Module, int]:
    teacher, tcfg, _ = load_run(cfg.train.distill_teacher)
    if tcfg.data.normalize != cfg.data.normalize:
        raise ConfigError(
            f"the teacher in {cfg.train.distill_teacher} was trained with data.normalize="
            f"{tcfg.data.normalize!r} but the student uses {cfg.data.normalize!r}; set "
            f"data.normalize={tcfg.data.normalize} for the student"
        )
    teacher.requires_grad_(False)
    return teacher.to(device).eval(), tcfg.data.img_size


def build_trainer(cfg: ExperimentConfig, out: Path, accelerator, model: torch.nn.Module, resume: bool) -> Trainer:
    """Optimizer, schedule, loaders, teacher, logger; restored from ``out/last_checkpoint`` on resume."""
    from accelerate.utils import set_seed

    from distrib.data.index import read_index
    from distrib.data.loader import build_loader, folds_for
    from distrib.data.transforms import augment_placement, build_transform
    from distrib.training.losses import build_loss
    from distrib.training.optim import build_optimizer, build_scheduler
    from distrib.versions import fold_protocol, write_fold_protocol, write_versions

    d, tc = cfg.data, cfg.train
    index = read_index(d.shards)
    k = int(index["folds"])
    train_folds = folds_for(d.fold, k) if d.fold >= 0 else list(range(k))
    val_split, val_folds = ("train", [d.fold]) if d.fold >= 0 else ("val", None)
    mean_std = _mean_std(cfg, model)
    augment_on, decode_on = augment_placement(cfg.augment, d, accelerator.device)
    val_loader = build_loader(
        d.shards,
        val_split,
        val_folds,
        accelerator.process_index,
        accelerator.num_processes,
        d.num_workers,
        d.eval_batch_size or d.batch_size,
        0,
        build_transform(None, d, train=False, mean_std=mean_std),
        d.seed,
        mode="eval",
        augment_on=augment_on,
        pin_memory=accelerator.device.type == "cuda",
    )
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    if tc.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    t = Trainer(
        cfg,
        out,
        accelerator,
        model,
        optimizer,
        None,
        build_loss(tc, cfg.model),
        val_loader,
        None,
        train_folds,
        0,
        0,
        mean_std,
        augment_on,
        decode_on,
    )
    t.loss_sum = t.loss_sum.to(accelerator.device)
    per_epoch = len(t._train_loader(0))
    t.micro_per_epoch = per_epoch // tc.grad_accum * tc.grad_accum  # a partial accumulation is dropped
    if t.micro_per_epoch == 0:
        raise ConfigError(
            f"train.grad_accum={tc.grad_accum} exceeds the {per_epoch} batches per epoch and rank; "
            "lower train.grad_accum or data.batch_size, or raise data.samples_per_epoch"
        )
    t.steps_per_epoch = t.micro_per_epoch // tc.grad_accum
    planned = planned_steps(tc.epochs, tc.max_steps, t.steps_per_epoch)
    t.scheduler = build_scheduler(optimizer, cfg.optim, t.steps_per_epoch, planned)
    if tc.distill_teacher:
        t.teacher, t.teacher_size = _load_teacher(cfg, accelerator.device)
    set_seed(tc.seed, device_specific=True)  # distinct dropout/augment streams per rank
    ckpt = find_checkpoint(out) if resume else None
    if resume and ckpt is None:
        dist.print0(f"--resume: no checkpoint in {out} yet; starting from scratch")
    if accelerator.is_main_process:
        for tmp in remove_stale_tmp(out):
            log.info("removed %s, a checkpoint write interrupted by a crash (the complete checkpoint is kept)", tmp)
        if ckpt is not None:
            check_resume_config(cfg, out, record=True, steps_per_epoch=t.steps_per_epoch)
    if ckpt is not None:
        _restore(t, ckpt)
    t.log = RunLogger(
        out, enabled=accelerator.is_main_process, resume_step=t.step if ckpt else None, accelerator=accelerator, cfg=cfg
    )
    if accelerator.is_main_process:
        save_config(cfg, out)
        write_versions(out)
        write_fold_protocol(out, fold_protocol(index, d.shards, d.fold, train_folds))
    dist.print0(
        f"training {cfg.model.name} on {accelerator.num_processes} process(es) "
        f"({dist.runtime_info(accelerator)['backend']}): {t.steps_per_epoch} steps/epoch, "
        f"{tc.epochs} epochs" + (f", resumed at epoch {t.epoch} step {t.step}" if ckpt else "")
    )
    return t


def _restore(t: Trainer, ckpt: Path) -> None:
    state, rank_state = load_checkpoint(t.accelerator, ckpt, t.model, t.optimizer)
    if state["world_size"] != t.accelerator.num_processes or state["grad_accum"] != t.cfg.train.grad_accum:
        raise DistribError(
            f"checkpoint {ckpt} was written with {state['world_size']} processes and grad_accum "
            f"{state['grad_accum']}; resume with the same settings or start a new run dir"
        )
    t.epoch, t.pos, t.step, t.done = state["epoch"], state["pos"], state["step"], state["done"]
    max_steps = t.cfg.train.max_steps
    if t.done and (max_steps == 0 or max_steps > t.step):  # a train.max_steps stop, and --resume raised the limit
        # the stop was checkpointed as its epoch's end; every epoch has steps_per_epoch steps, so the step
        # count says where inside the epoch it stopped, and training continues from that batch
        t.done = False
        t.epoch, done_in_epoch = divmod(t.step, t.steps_per_epoch)
        t.pos = done_in_epoch * t.cfg.train.grad_accum
    # an lr is a function of (optim config, planned steps, step): rebuilt for the current plan, not the saved one,
    # so a longer train.epochs/max_steps re-plans the schedule (config.changes.EXTEND_RULE)
    t.scheduler.step_update(t.step)
    t.best_auc, t.best_epoch, t.best_metrics = state["best_auc"], state["best_epoch"], state["best_metrics"]
    t.elapsed_before = state["elapsed"]
    t.epoch_rng, t.pending_rng = rank_state["epoch_start"], rank_state["now"]
    t.loss_sum, t.loss_count = rank_state["loss_sum"].to(t.accelerator.device, torch.float64), rank_state["loss_count"]
    t.skipped_train = rank_state.get("skipped_train", 0)
