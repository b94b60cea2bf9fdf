"""Search beyond grids (``tune.search: random|optuna``): sampled configs, each one Tune trial running all K folds.

    distrib tune CONFIG --grid GRID --search optuna --num-samples 16 [--scheduler asha] --out SWEEP_DIR

The grid YAML holds lists (``optim.lr: [1.0e-4, 3.0e-4]``, sampled as a choice) and distributions
(``optim.lr: {loguniform: [1.0e-5, 1.0e-3]}``, also ``uniform``, ``randint`` (high exclusive), ``choice``),
which become ``ray.tune.loguniform`` etc. A sampled config is ONE trial (``run_cv_trial``): it trains fold
0..K-1 one after another, each exactly like a grid trial (``trial.run_fold``: same run dir
``trials/<config>_fold<k>``, same trial_result.json), and reports after each fold
``{fold, fold_auc, mean_auc, folds_done}``, so ``training_iteration`` == folds done. The searcher
(``random``: Tune's BasicVariantGenerator; ``optuna``: Tune's OptunaSearch in a ConcurrencyLimiter) sees
``mean_auc``; a finished config's last result is its mean K-fold AUC. ASHA
(``ASHAScheduler(time_attr="training_iteration", max_t=K, grace_period=1, reduction_factor=2)``) compares
configs after the same number of folds and stops a config as a whole; the summary marks it ``stopped``,
and only configs with all K folds can be best, so the OOF table still has every sample once.

Each trial claims a config id ``c<i>`` in ``SWEEP_DIR/samples/c<i>.json`` (its params, Tune trial id,
fold AUCs); a retried or ``--resume``d trial (``Tuner.restore``: the searcher state is restored too) finds
its id by trial id and re-reports its finished folds from their trial_result.json instead of retraining.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from distrib.atomic import write_json
from distrib.config import ConfigError, ExperimentConfig
from distrib.errors import DistribError
from distrib.extras import require
from distrib.sweep.grid import grid_configs, is_sampled, params_overrides
from distrib.sweep.report import pick_metric
from distrib.sweep.trial import run_fold

SAMPLES = "samples"  # SWEEP_DIR/samples/c<i>.json: one record per sampled config
METRIC = "mean_auc"  # what the searcher and ASHA see: the running mean fold AUC


def check_search(grid: dict, tune_cfg) -> None:
    """A distribution needs random|optuna search; sampling needs something to sample."""
    if tune_cfg.search == "grid":
        for key, values in grid.items():
            if is_sampled(values):
                raise ConfigError(
                    f"the sweep grid samples '{key}' from {values} but tune.search=grid only "
                    f"enumerates lists; pass --search random or --search optuna (with --num-samples "
                    f"N), or give '{key}' a list of values"
                )
    elif not grid:
        raise ConfigError(
            f"tune.search={tune_cfg.search} has nothing to sample: the grid is empty; pass --grid "
            "with lists or distributions, e.g. 'optim.lr: {loguniform: [1.0e-5, 1.0e-3]}'"
        )
    if tune_cfg.search == "optuna":
        require("optuna", extra="search", feature="tune.search=optuna")


def _candidates(values) -> list:
    if isinstance(values, list):
        return values
    ((name, args),) = values.items()
    return [args[0], args[1] - 1] if name == "randint" else list(args)


def validation_configs(grid: dict, search: str) -> list[dict]:
    """What the driver builds before starting: every grid config, or for a sampled space each key's
    bounds/choices with the other keys at their first value (a bad value fails before Ray starts)."""
    if search == "grid":
        return grid_configs(grid)
    first = {k: _candidates(v)[0] for k, v in grid.items()}
    return [
        {"id": "probe", "overrides": params_overrides({**first, k: value})}
        for k, v in grid.items()
        for value in _candidates(v)
    ]


def param_space(grid: dict) -> dict:
    """``{"grid": {key: tune.<distribution>}}``; a plain list is a ``tune.choice``."""
    from ray import tune

    def sampler(values):
        if isinstance(values, list):
            return tune.choice(values)
        ((name, args),) = values.items()
        return tune.choice(args) if name == "choice" else getattr(tune, name)(*args)

    return {"grid": {k: sampler(v) for k, v in grid.items()}}


def tune_config(cfg: ExperimentConfig):
    """Searcher (random or Optuna, seeded by train.seed) + optional ASHA over folds, metric mean_auc."""
    import ray
    from ray import tune

    t = cfg.tune
    if t.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter

        from distrib.sweep.optuna_cv import CVOptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        res = ray.cluster_resources()  # Optuna learns only from finished configs: cap to what runs at once
        slots = min(
            res.get("CPU", 1.0) / t.cpus_per_trial,
            res.get("GPU", 0.0) / t.gpus_per_trial if t.gpus_per_trial else math.inf,
        )
        searcher = ConcurrencyLimiter(
            CVOptunaSearch(metric=METRIC, mode="max", seed=cfg.train.seed, folds=t.folds),
            max_concurrent=t.max_concurrent or max(1, int(slots)),
        )
    else:
        from ray.tune.search import BasicVariantGenerator

        searcher = BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=t.max_concurrent)
    scheduler = None
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=t.folds, grace_period=1, reduction_factor=2)
    return tune.TuneConfig(
        metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples
    )


def check_fresh(out_dir: Path) -> None:
    """A sampled sweep cannot be re-run into a dir that holds one (its configs would mix); --resume continues it."""
    if (Path(out_dir) / SAMPLES).is_dir():
        raise DistribError(
            f"{out_dir} already holds a sampled sweep ({out_dir / SAMPLES}); pass --resume to "
            "continue it, or choose a new --out"
        )


def _plain(value):
    return value.item() if hasattr(value, "item") else value  # numpy scalars from Tune's samplers -> YAML-safe


def _claim(samples: Path, trial_id: str, params: dict) -> dict:
    """This trial's record: found by trial id (retry/--resume), else the next free ``c<i>`` (O_EXCL claim)."""
    samples.mkdir(parents=True, exist_ok=True)
    for path in samples.glob("c*.json"):
        record = json.loads(path.read_text())
        if record["trial_id"] == trial_id:
            return {**record, "status": "running"}
    i = 0
    while True:
        try:
            os.close(os.open(samples / f"c{i}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            i += 1
    record = {
        "config_id": f"c{i}",
        "trial_id": trial_id,
        "params": params,
        "overrides": params_overrides(params),
        "folds_done": 0,
        "fold_aucs": [],
        "mean_auc": None,
        "status": "running",
    }
    write_json(samples / f"c{i}.json", record, indent=1)
    return record


def _fold_auc(spec: dict, record: dict, fold: int, sampled: dict) -> float:
    cid = record["config_id"]
    done = Path(spec["trials_dir"]) / f"{cid}_fold{fold}" / "trial_result.json"
    result = (
        json.loads(done.read_text())
        if done.is_file()  # finished before a retry/--resume
        else run_fold(spec, cid, fold, record["overrides"], sampled, epoch_reports=False)
    )
    auc = pick_metric(result["metrics"], "auc")
    if not math.isfinite(auc):  # Optuna refuses NaN and would keep the config RUNNING forever
        raise DistribError(f"config {cid} fold {fold} has no finite validation AUC ({auc}); see {done.parent}")
    return auc


def run_cv_trial(params: dict, spec: dict) -> None:
    """Tune function trainable: one sampled config -> its K folds in turn, one ``tune.report`` per fold."""
    from ray import tune

    sampled = {k: _plain(v) for k, v in params.get("grid", {}).items()}
    samples = Path(spec["sweep_dir"]) / SAMPLES
    record = _claim(samples, tune.get_context().get_trial_id(), sampled)
    cid, aucs = record["config_id"], []
    for fold in range(int(spec["folds"])):
        try:
            aucs.append(_fold_auc(spec, record, fold, sampled))
        except Exception:  # a failed fold: the config errors (max_failures retries it, finished folds kept)
            write_json(samples / f"{cid}.json", {**record, "status": "error"}, indent=1)
            raise
        record.update(folds_done=len(aucs), fold_aucs=aucs, mean_auc=sum(aucs) / len(aucs))
        write_json(samples / f"{cid}.json", record, indent=1)  # before the report: ASHA may stop us there
        tune.report({"fold": fold, "fold_auc": aucs[-1], METRIC: record["mean_auc"], "folds_done": len(aucs)})


def sampled_configs(out_dir: Path, results, cfg: ExperimentConfig, interrupted: bool) -> list[dict]:
    """The sampled configs in id order, each with its status: complete (all K folds), stopped (ASHA ended it
    early), error, or incomplete (interrupted); the status is written back to its samples/ record."""
    errors = {(r.metrics or {}).get("trial_id") for r in results if r.error}
    out = []
    paths = sorted((Path(out_dir) / SAMPLES).glob("c*.json"), key=lambda p: int(p.stem[1:]))
    for path in paths:
        record = json.loads(path.read_text())
        if record["folds_done"] >= cfg.tune.folds:
            status = "complete"
        elif record["status"] == "error" or record["trial_id"] in errors:
            status = "error"
        elif cfg.tune.scheduler == "asha" and not interrupted:
            status = "stopped"
        else:
            status = "incomplete"
        record["status"] = status
        write_json(path, record, indent=1)
        out.append(
            {
                "id": record["config_id"],
                "params": record["params"],
                "overrides": record["overrides"],
                "status": status,
                "folds_done": record["folds_done"],
                "mean_auc": record["mean_auc"],
                "trial_id": record["trial_id"],
            }
        )
    return out
