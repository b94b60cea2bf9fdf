"""Issue 26.6: every private or undocumented internal of Ray, Optuna, accelerate and timm that src/ touches
(docs/DESIGN.md, "Library internals") still exists and still behaves as the code relies on. Each failure
names the internal, the file that uses it, and what breaks, so a version bump says where to look."""

from __future__ import annotations

import inspect
import logging

import pytest


def _need(ok: bool, internal: str, user: str, breaks: str) -> None:
    assert ok, f"{internal} moved or changed (used by {user}): {breaks}. See docs/DESIGN.md, library internals"


def test_ray_enable_ray_cluster_constant_is_still_read_by_the_node_ip_lookup():
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services

    internal = "ray._private.ray_constants.ENABLE_RAY_CLUSTER"
    user = "src/distrib/sweep/local_ray.py (start_ray)"
    _need(
        isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool),
        internal,
        user,
        "the local cluster would bind the routable IP instead of 127.0.0.1",
    )
    _need(
        "ENABLE_RAY_CLUSTER" in inspect.getsource(services),
        f"{internal} (read in ray._private.services)",
        user,
        "setting it no longer keeps the node IP on 127.0.0.1",
    )


def test_ray_worker_start_hooks_exist():
    import ray._private.services as services
    import ray.scripts.scripts as scripts

    user = "src/distrib/sweep/ray_nodes.py (_WORKER_START)"
    fn = getattr(services, "resolve_ip_for_localhost", None)
    _need(
        callable(fn) and len(inspect.signature(fn).parameters) == 1,
        "ray._private.services.resolve_ip_for_localhost(host)",
        user,
        "worker raylets join on the routable IP, not 127.0.0.1",
    )
    _need(callable(getattr(scripts, "main", None)), "ray.scripts.scripts.main", user, "worker nodes cannot start")


def test_ray_tune_fit_still_imports_through_the_usage_tagger():
    import ray.air._internal.usage as usage

    _need(
        callable(getattr(usage, "tag_callbacks", None)),
        "ray.air._internal.usage.tag_callbacks",
        "src/distrib/sweep/driver.py (TUNE_FIT_IMPORTS)",
        "nothing functional; the mlflow pre-import may then be wasted time and can be dropped",
    )


def test_optuna_search_private_trial_maps_let_a_cv_config_end_pruned():
    import optuna
    from ray import tune

    from distrib.sweep.optuna_cv import CVOptunaSearch

    searcher = CVOptunaSearch(space={"lr": tune.loguniform(1e-4, 1e-2)}, metric="auc", mode="max", seed=0, folds=3)
    user = "src/distrib/sweep/optuna_cv.py (CVOptunaSearch.on_trial_complete)"
    for name, kind in (("_ot_trials", dict), ("_completed_trials", set), ("_ot_study", optuna.Study)):
        _need(
            isinstance(getattr(searcher, name, None), kind),
            f"ray.tune.search.optuna.OptunaSearch.{name}",
            user,
            "ASHA-stopped configs would be told to Optuna as COMPLETE with a partial mean",
        )
    assert searcher.suggest("t0") is not None
    searcher.on_trial_complete("t0", {"auc": 0.9, "folds_done": 1})
    states = [t.state for t in searcher._ot_study.trials]
    _need(
        states == [optuna.trial.TrialState.PRUNED],
        "OptunaSearch._ot_study / _ot_trials semantics",
        user,
        f"a config stopped after 1 of 3 folds ended {states}, not PRUNED",
    )


def test_accelerate_reset_state_classmethods_exist():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    user = "src/distrib/training/dist.py (finish)"
    breaks = "a second run in one process (tests, Tune trials) would reuse the first run's accelerator state"
    fn = getattr(AcceleratorState, "_reset_state", None)
    _need(
        callable(fn) and "reset_partial_state" in inspect.signature(fn).parameters,
        "accelerate.state.AcceleratorState._reset_state(reset_partial_state)",
        user,
        breaks,
    )
    for cls in (GradientState, PartialState):
        _need(
            callable(getattr(cls, "_reset_state", None)), f"accelerate.state.{cls.__name__}._reset_state", user, breaks
        )


def test_accelerator_step_counter_drives_gradient_accumulation():
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import GradientAccumulationPlugin

    plugin = GradientAccumulationPlugin(num_steps=2, sync_with_dataloader=False)
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=plugin)
    try:
        model = torch.nn.Linear(2, 1)
        with accelerator.accumulate(model):
            pass
        _need(
            getattr(accelerator, "step", None) == 1,
            "accelerate.Accelerator.step (micro-step counter)",
            "src/distrib/training/state.py (start of each epoch)",
            "resetting it no longer restarts gradient accumulation at an epoch boundary",
        )
        accelerator.step = 0  # as training/state.py does at each epoch start
        with accelerator.accumulate(model):
            synced = accelerator.sync_gradients
        _need(
            synced is False,
            "accelerate.Accelerator.step (read by accumulate)",
            "src/distrib/training/state.py (start of each epoch)",
            "after step = 0 the next micro-batch synced: accumulation windows drift across epochs and resume",
        )
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def test_timm_load_pretrained_reports_missing_keys_on_its_module_logger(tmp_path):
    import safetensors.torch
    import timm
    from timm.models import load_pretrained

    from distrib.errors import DistribError
    from distrib.models.timm_models import create_timm

    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    dropped = next(k for k in state if k.startswith("layer1."))
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items() if k != dropped}, str(path))

    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger(load_pretrained.__module__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        overlay = dict(file=str(path), url=None, hf_hub_id=None, hf_hub_filename=None, source=None)
        timm.create_model("test_resnet", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    _need(
        any(m.startswith("Missing keys (") and dropped in m for m in records),
        f"timm's 'Missing keys (...)' log line on logger {load_pretrained.__module__!r}",
        "src/distrib/models/timm_models.py (_KeyReport)",
        "a pretrained file of another architecture could leave the backbone silently random",
    )
    with pytest.raises(DistribError, match="does not hold weights") as e:
        create_timm("test_resnet", str(path), num_classes=1)
    assert dropped in str(e.value)
