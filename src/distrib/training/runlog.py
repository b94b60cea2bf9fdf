"""Run-directory logging: training_log.csv, TensorBoard events, tqdm bar, training_curves.png, trackers.

A ``RunLogger`` built with ``enabled=False`` (every rank but 0) does nothing, which is how the
training loop logs without ever asking which rank it is on. On resume the CSV rows and TensorBoard
events past the checkpoint's step are dropped so the logs read as one uninterrupted run.

``train.trackers``: "tensorboard" is this module's own SummaryWriter (it needs ``purge_step`` on
resume, which accelerate's tracker does not expose); every other name (mlflow, wandb, ...) is passed
to the Accelerator as ``log_with`` and receives the same scalars, the flattened config as params and
``evaluation_results.json`` as an artifact (MLflow). A resumed run starts a new tracker run.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless training machines
import matplotlib.pyplot as plt  # noqa: E402

from distrib.atomic import atomic_path, save_figure  # noqa: E402
from distrib.config import ConfigError, ExperimentConfig, config_to_dict  # noqa: E402

_PACKAGES = {"mlflow": "mlflow-skinny", "comet_ml": "comet-ml"}  # pip names that differ from the tracker name


def check_trackers(trackers: list[str]) -> None:
    """Fail before the process group starts when a requested tracker cannot run here."""
    import os

    from accelerate.utils import imports

    from distrib.extras import require

    if "mlflow" in trackers:
        require("mlflow", extra="mlflow", feature="train.trackers=[mlflow]")
    for name in trackers:
        if name != "tensorboard" and not getattr(imports, f"is_{name}_available")():
            raise ConfigError(
                f"train.trackers lists {name!r} but its package is not installed; "
                f"pip install {_PACKAGES.get(name, name)}, or drop it from train.trackers"
            )
    if "mlflow" not in trackers:
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    fix = (
        "set MLFLOW_TRACKING_URI=file:/shared/mlruns with MLFLOW_ALLOW_FILE_STORE=true, or point it at a "
        "server you started (http://127.0.0.1:5000)"
    )
    if not uri:  # MLflow 3 would use sqlite:///mlflow.db in the working directory, which Ray trials change
        raise ConfigError(f"train.trackers lists 'mlflow' but MLFLOW_TRACKING_URI is not set; {fix}")
    if (uri.startswith("file:") or ":" not in uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ConfigError(
            f"train.trackers lists 'mlflow' with the local file store MLFLOW_TRACKING_URI={uri!r}, "
            f"which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; {fix}"
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}; lists become strings (tracker params are scalars)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


METRIC_COLUMNS = (
    "val_loss",
    "auc",
    "f1",
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "eer",
    "ap",
    "group_auc",
    "group_eer",
    "group_ap",
)  # group_*: eval.group_agg mean/max, else empty
LOG_COLUMNS = ("epoch", "step", "lr", "train_loss", *METRIC_COLUMNS[:9], "seconds", *METRIC_COLUMNS[9:])


class RunLogger:
    """Writes the run's logs on rank 0; a silent no-op elsewhere."""

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool,
        resume_step: int | None = None,
        accelerator=None,
        cfg: ExperimentConfig | None = None,
    ):
        self.out = Path(out_dir)
        self.enabled = enabled
        self.csv_path = self.out / "training_log.csv"
        self._bar = None
        self._tb = None
        self._acc = accelerator if enabled and accelerator is not None and accelerator.log_with else None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.csv_path.is_file():
            self._write_rows([])
        else:  # drop rows a killed run logged after its last checkpoint
            self._write_rows([r for r in self.rows() if int(r["step"]) <= resume_step])
        # purge_step discards events the killed run wrote after its last checkpoint
        if cfg is None or "tensorboard" in cfg.train.trackers:
            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=resume_step)
        if self._acc is not None:  # MLFLOW_EXPERIMENT_NAME / MLFLOW_TAGS in the environment win (sweeps)
            self._acc.init_trackers(
                cfg.name, config=_flat(config_to_dict(cfg)), init_kwargs={"mlflow": {"run_name": self.out.name}}
            )
            self._mlflow(lambda client, run_id: client.set_tag(run_id, "distrib.run_dir", str(self.out.resolve())))

    def _write_rows(self, rows: list[dict]) -> None:
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def rows(self) -> list[dict]:
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    # progress bar -----------------------------------------------------------------------------
    def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False, mininterval=1.0
            )

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # scalars ------------------------------------------------------------------------------------
    def scalars(self, step: int, values: dict) -> None:
        """TensorBoard scalars, e.g. {"train/loss": .., "train/lr": .., "train/images_per_s": ..}."""
        values = {
            k: float(v) for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))
        }
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._acc is not None:
            self._acc.log(values, step=step)

    def epoch_row(self, row: dict) -> None:
        """Append one evaluation row to training_log.csv and its metrics to TensorBoard."""
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_COLUMNS).writerow({k: row.get(k, "") for k in LOG_COLUMNS})
        self.scalars(int(row["step"]), {f"val/{k}": row.get(k) for k in METRIC_COLUMNS})
        if self._tb is not None:
            self._tb.flush()  # per-step scalars are flushed by the writer's own timer; evaluations at once
        self.plot_curves()

    def plot_curves(self) -> Path | None:
        """training_curves.png: train/val loss and val AUC/F1/EER per epoch."""
        if not self.enabled:
            return None
        rows = self.rows()
        if not rows:
            return None
        ep = [int(r["epoch"]) for r in rows]
        num = lambda key: [float(r[key]) if r[key] not in ("", None) else math.nan for r in rows]  # noqa: E731
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(ep, num("train_loss"), "o-", label="train loss")
        a.plot(ep, num("val_loss"), "o-", label="val loss")
        a.set(xlabel="epoch", ylabel="loss", title="loss")
        a.legend()
        for key in ("auc", "f1", "eer", "group_auc"):
            if key in rows[0] and any(r[key] not in ("", None) for r in rows):
                b.plot(ep, num(key), "o-", label=f"val {key}")
        b.set(xlabel="epoch", ylim=(0, 1.02), title="validation metrics")
        b.legend()
        return save_figure(fig, self.out / "training_curves.png")

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:  # only here: a tracker action must never end the TensorBoard writer early
            self._tb.close()
            self._tb = None
        if self._acc is not None:  # the final results as an artifact, then end the tracker runs
            results = self.out / "evaluation_results.json"
            if results.is_file():
                self._mlflow(lambda client, run_id: client.log_artifact(run_id, str(results)))
            for tracker in self._acc.trackers:
                tracker.finish()
            self._acc = None

    def _mlflow(self, action) -> None:
        """``action(MlflowClient(), run_id)`` on this run's MLflow run, if MLflow is a tracker."""
        for tracker in self._acc.trackers:
            if tracker.name == "mlflow":
                from mlflow import MlflowClient

                action(MlflowClient(), tracker.tracker.info.run_id)
