"""``distrib predict``: apply a trained run or a whole cascade to new images -> one CSV row per image.

    distrib predict --model runs/demo/stage1 --images photos/ --out preds.csv
    distrib predict --model runs/demo/cascade.yaml --images runs/demo/shards --split test --out preds.csv

Preprocessing is the training one, read from each run's saved config: the cascade's own stage objects
(``cascade.run``: one decode per image, each stage's eval transform with its normalization,
``highpass`` and size) score the batches, so a run predicts exactly what its evaluation did and a
cascade exactly what ``distrib cascade`` does (same band, same experts, same meta threshold; one refit
model per expert when the stack was embedded with ``embed.inference: refit``, see ``expert_models``).

Rows: ``path, group`` (+ ``split, label`` for shards / labelled CSVs) then
- a run: ``prob`` and ``decision``: ``clean / uncertain / pit`` under a feasible 3-way band of its
  ``thresholds.json`` (next to best_model.pth, or ``--thresholds``), else 0/1 at its Youden threshold
  (that file's, or the run's own: ``optimal_threshold`` of evaluation_results.json, fit on its val
  predictions), 0.5 only when the run saved neither (said in the result). Thresholds fit on group scores
  (``thresholds.group_agg``, ``unit: group`` in thresholds.json) decide per group: ``score`` is then the
  group's mean/max prob and every image of a group gets its group's decision;
- a cascade: ``stage1_prob``, ``route`` (``stage1`` or ``escalated``), ``prob_<expert>`` and
  ``meta_prob`` (escalated rows only: stages 2+3 run on those alone), ``decision`` and ``score``
  (``cascade.run.cascade_score``, decided at 0.5).
Group-level scores go to ``<out stem>_groups.csv`` when groups are given; metrics (sklearn, via
``metrics.binary_metrics``) are added when labels are. Skipped inputs go to ``<stem>_skipped.csv`` beside the CSV.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.atomic import atomic_path, write_json
from distrib.errors import DataError, DistribError
from distrib.metrics import binary_metrics

log = logging.getLogger(__name__)
BAND_NAMES = {0: "clean", -1: "uncertain", 1: "pit"}


def _run_rule(run_dir: Path, thresholds: str | None) -> dict:
    """How a run's probability becomes a decision: its band, else the Youden threshold of its saved val scores."""
    path = Path(thresholds) if thresholds else run_dir / "thresholds.json"
    if not path.is_file():
        if thresholds:
            raise DataError(
                f"--thresholds {thresholds} not found; write one with 'distrib thresholds --pred "
                f"{run_dir}/val_predictions.csv --out {run_dir} thresholds.fit_split=val'"
            )
        return _val_youden(run_dir)
    try:
        th = json.loads(path.read_text())
        th["single"]["youden"]["threshold"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"--thresholds {path}: not a thresholds.json that distrib thresholds wrote ({type(e).__name__}: {e}); "
            f"write one with 'distrib thresholds --pred {run_dir}/val_predictions.csv --out DIR'"
        ) from None
    band = th.get("band", {})
    # thresholds fit on group scores (thresholds.group_agg) decide on the same unit: a group's mean/max prob
    agg = th.get("group_agg") or next(
        (a for a in ("mean", "max") if th.get("unit", "").startswith(f"group ({a}")), "none"
    )
    unit = {"unit": "sample"} if agg == "none" else {"unit": "group", "group_agg": agg}
    if band.get("feasible"):
        return {
            "kind": "band",
            "t_low": band["t_low"],
            "t_high": band["t_high"],
            "source": str(path),
            "threshold": th["single"]["youden"]["threshold"],
            **unit,
        }
    return {"kind": "single", "threshold": th["single"]["youden"]["threshold"], "source": str(path), **unit}


def _val_youden(run_dir: Path) -> dict:
    """The run's Youden threshold on its own val predictions (training wrote it; fit on val, never test)."""
    from distrib.stacking.thresholds import threshold_youden

    res = run_dir / "evaluation_results.json"
    saved = json.loads(res.read_text()).get("optimal_threshold") if res.is_file() else None
    if saved is not None:
        return {"kind": "single", "threshold": float(saved), "source": f"{res} (optimal_threshold: Youden on val)"}
    val = run_dir / "val_predictions.csv"
    if val.is_file():
        df = pd.read_csv(val)
        if df["label"].nunique() == 2:
            return {
                "kind": "single",
                "threshold": float(threshold_youden(df["label"].to_numpy(), df["prob"].to_numpy())),
                "source": f"{val} (Youden on val)",
            }
    log.warning(
        f"predict: {run_dir} has no evaluation_results.json optimal_threshold nor two-class "
        "val_predictions.csv; deciding at prob >= 0.5"
    )
    return {"kind": "default", "threshold": 0.5, "source": "default 0.5"}


class RunScorer:
    """One run's best model, fed exactly as its evaluation fed it."""

    def __init__(self, run_dir: str | Path, device, thresholds: str | None = None):
        from distrib.cascade.run import MultiSizeTransform, Stage

        run_dir = Path(run_dir)
        if not (run_dir / "best_model.pth").is_file():
            raise DataError(
                f"{run_dir / 'best_model.pth'} not found: --model must be a finished run directory "
                "(distrib train ... --out RUN_DIR) or a cascade YAML"
            )
        self.stage = Stage(str(run_dir), device)
        self.transform = MultiSizeTransform([self.stage.size])
        self.rule = _run_rule(run_dir, thresholds)
        self.batch_size, self.threshold = 64, self.rule["threshold"]
        self.info = {"model": str(run_dir), "kind": "run", "decision_rule": self.rule}

    def __call__(self, flat) -> dict:
        return {"prob": self.stage(self.transform, flat)}

    def finish(self, df: pd.DataFrame) -> pd.DataFrame:
        """``decision`` on ``score``: the image's prob, or its group's mean/max prob when the thresholds were fit
        on group scores (an image without a group is a group of one)."""
        from distrib.stacking.thresholds import decide

        p = df["prob"].to_numpy(dtype=float)
        if self.rule.get("unit") == "group":
            grouped = df["group"].astype(str) != ""
            group_p = df.groupby("group")["prob"].transform(self.rule["group_agg"]).to_numpy(dtype=float)
            p = np.where(grouped, group_p, p)
        if self.rule["kind"] == "band":
            dec = decide(p, self.rule["t_low"], self.rule["t_high"])
            df["decision"] = [BAND_NAMES[int(d)] for d in dec]
        else:
            df["decision"] = (p >= self.rule["threshold"]).astype(int)
        df["score"] = p
        return df

    def metrics(self, y, df) -> dict:
        return {"run": binary_metrics(y, df["prob"], self.rule["threshold"])}


class CascadeScorer:
    """The cascade of ``distrib cascade``: stage 1 on every image, experts + meta-model on the band only."""

    def __init__(self, cascade_yaml: str | Path, device):
        from distrib.cascade.config import ExpertConfig, load_cascade_config
        from distrib.cascade.run import Expert, MultiSizeTransform, Stage, fit_or_load
        from distrib.stacking.stack import load_meta

        cfg = load_cascade_config(cascade_yaml)
        self.booster, self.meta = load_meta(cfg.stack.dir)
        specs = cfg.experts or [ExpertConfig(name=e["name"], oof=e["path"]) for e in self.meta["experts"]]
        self.stage1 = Stage(cfg.stage1.run, device)
        self.experts = [Expert(s, device, cfg.expert_models) for s in specs]
        with tempfile.TemporaryDirectory() as tmp:  # the same fits as distrib cascade (bootstrap only adds CIs)
            th1 = fit_or_load(
                cfg.stage1.thresholds,
                Path(cfg.stage1.run) / "val_predictions.csv",
                Path(tmp) / "s1",
                "stage1",
                cfg.recall,
                cfg.specificity,
                0,
            )
            th3 = fit_or_load(
                cfg.stack.thresholds,
                Path(cfg.stack.dir) / "meta_predictions.parquet",
                Path(tmp) / "s3",
                "meta",
                cfg.recall,
                cfg.specificity,
                0,
                fit_split="oof",
                quiet=True,
            )
        band = th1["band"]
        self.t_low, self.t_high = (band["t_low"], band["t_high"]) if band["feasible"] else (-np.inf, np.inf)
        self.tau = th3["single"][cfg.stack.rule]["threshold"]
        self.transform = MultiSizeTransform([self.stage1.size] + [e.size for e in self.experts])
        self.batch_size, self.threshold = cfg.batch_size, 0.5  # the cascade score decides at 0.5
        self.info = {
            "model": str(cascade_yaml),
            "kind": "cascade",
            "stage1_band": band,
            "meta_threshold": self.tau,
            "experts": [e.name for e in self.experts],
            "models_per_expert": {e.name: e.n_models for e in self.experts},
        }

    def __call__(self, flat) -> dict:
        import torch

        from distrib.cascade.run import route
        from distrib.stacking.stack import predict_meta

        p1 = self.stage1(self.transform, flat)
        _, esc = route(p1, self.t_low, self.t_high)
        n = len(p1)
        cols = {"stage1_prob": p1, "route": np.where(esc, "escalated", "stage1")}
        cols.update({f"prob_{e.name}": np.full(n, np.nan) for e in self.experts})
        cols["meta_prob"] = np.full(n, np.nan)
        if esc.any():
            part = flat[torch.from_numpy(esc)]
            frame = {}
            for e in self.experts:
                frame.update(e(self.transform, part))
                cols[f"prob_{e.name}"][esc] = frame[f"{e.name}__prob"]
            cols["meta_prob"][esc] = predict_meta(self.booster, self.meta, pd.DataFrame(frame))
        return cols

    def finish(self, df: pd.DataFrame) -> pd.DataFrame:
        from distrib.cascade.run import cascade_score, route

        dec, esc = route(df["stage1_prob"].to_numpy(), self.t_low, self.t_high)
        df["decision"] = np.where(esc, (df["meta_prob"].to_numpy() >= self.tau).astype(int), dec)
        df["score"] = cascade_score(df["stage1_prob"], self.t_low, self.t_high, df["meta_prob"], self.tau)
        return df

    def metrics(self, y, df) -> dict:
        return {"cascade": binary_metrics(y, df["score"], 0.5), "stage1": binary_metrics(y, df["stage1_prob"], 0.5)}


def load_scorer(model: str | Path, device: str = "auto", thresholds: str | None = None):
    """A RunScorer for a run directory, a CascadeScorer for a cascade YAML."""
    from distrib.cascade.run import resolve_device

    p = Path(model)
    if p.is_dir():
        return RunScorer(p, resolve_device(device), thresholds)
    if p.suffix.lower() in (".yaml", ".yml") and p.is_file():
        return CascadeScorer(p, resolve_device(device))
    raise DataError(
        f"--model {model}: not a run directory or a cascade YAML" + ("" if p.exists() else " (the path does not exist)")
    )


def _group_table(df: pd.DataFrame, labelled: bool, group_decision: bool) -> pd.DataFrame:
    """One row per group: its images' mean/max prob (a run) or score (a cascade); ``decision`` when it was made
    per group (a run whose thresholds.json was fit on group scores)."""
    base = "prob" if "prob" in df.columns else "score"
    agg = {"n": (base, "size"), "score_mean": (base, "mean"), "score_max": (base, "max")}
    if labelled:
        agg["label"] = ("label", "max")
    if group_decision:
        agg["decision"] = ("decision", "first")
    return df[df["group"].astype(str) != ""].groupby("group", sort=True).agg(**agg).reset_index()


def predict(
    model: str | Path,
    images: str | Path,
    out: str | Path,
    device: str = "auto",
    batch_size: int = 0,
    workers: int = 0,
    split: str | None = None,
    thresholds: str | None = None,
) -> dict:
    """Score every image of ``images`` with ``model``; write ``out`` (CSV) and, beside it, ``<stem>_skipped.csv``,
    ``<stem>_groups.csv`` (when groups exist) and ``<stem>_summary.json`` (the returned summary)."""
    from tqdm.auto import tqdm

    from distrib.inference.images import open_images, skipped_frame

    if batch_size < 0 or workers < 0:
        raise DistribError(f"predict: --batch-size {batch_size} and --workers {workers} must be >= 0")
    source = open_images(images, split)  # input problems fail before any model loads
    scorer = load_scorer(model, device, thresholds)
    bs = batch_size or scorer.batch_size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts, t0 = [], time.perf_counter()
    with tqdm(total=source.total, desc="predict", unit="img", disable=None, dynamic_ncols=True) as bar:
        for b in source.batches(scorer.transform, bs, workers):
            cols = scorer(b["image"])
            parts.append(
                pd.DataFrame({"path": b["path"], "group": b["group"], "split": b["split"], "label": b["label"], **cols})
            )
            bar.update(len(b["path"]))
    seconds = time.perf_counter() - t0
    skipped, skipped_csv = skipped_frame(source), out.with_name(f"{out.stem}_skipped.csv")  # per --out, like _groups
    with atomic_path(skipped_csv) as tmp:
        skipped.to_csv(tmp, index=False)
    if not parts:
        raise DataError(
            f"none of the {source.total} images in {images} could be read; reasons in "
            f"{skipped_csv} (first: {skipped['reason'].iloc[0] if len(skipped) else '?'})"
        )
    df = scorer.finish(pd.concat(parts, ignore_index=True))
    labelled = bool((df["label"] >= 0).any())
    drop = [c for c, keep in (("split", source.kind == "shards"), ("label", labelled)) if not keep]
    with atomic_path(out) as tmp:
        df.drop(columns=drop).to_csv(tmp, index=False)
    result = {
        "out": str(out),
        "skipped_csv": str(skipped_csv),
        **scorer.info,
        "images": str(images),
        "n": int(len(df)),
        "skipped": int(len(skipped)),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(df) / max(seconds, 1e-9), 2),
        "decisions": {str(k): int(v) for k, v in df["decision"].value_counts().sort_index().items()},
    }
    if labelled:
        lab = df[df["label"] >= 0]
        result["metrics"] = scorer.metrics(lab["label"].to_numpy().astype(int), lab)
    if (df["group"].astype(str) != "").any():
        rule = getattr(scorer, "rule", {})
        groups = _group_table(df, labelled, rule.get("unit") == "group")
        gpath = out.with_name(f"{out.stem}_groups.csv")
        with atomic_path(gpath) as tmp:
            groups.to_csv(tmp, index=False)
        result.update(groups_csv=str(gpath), n_groups=int(len(groups)))
        if labelled and groups["label"].nunique() == 2:
            result["group_metrics"] = binary_metrics(
                groups["label"].to_numpy(), groups[f"score_{rule.get('group_agg', 'max')}"], scorer.threshold
            )
    write_json(out.with_name(f"{out.stem}_summary.json"), result)
    return result


__all__ = ["predict", "load_scorer", "RunScorer", "CascadeScorer"]
