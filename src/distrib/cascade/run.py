"""3-stage cascade inference: stage-1 filter band -> two aligned stage-2 experts -> stage-3 meta-model.

    distrib cascade --config launch/configs/cascades/deepfake.yaml --split test --out runs/demo/cascade

Stage 1 scores every streamed sample; those outside its uncertain band (fit on stage 1's own
val predictions with ``distrib.stacking.thresholds``, never on this split) are decided there. The rest go to
both experts, each = K fold models + the alignment saved by ``distrib embed`` (``AlignedExpert``:
the same projection and Procrustes rotation as the training table, fold-averaged like val/test
rows) or, when the expert was embedded with ``embed.inference: refit`` (``expert_models``), its ONE
refit model aligned into the same frame; then with ``evaluate_all_stages`` the K fold models also
score every sample, for the folds-vs-refit meta AUC and the K-fold cost on the same images; and the meta-model decides with its threshold fit on its OOF predictions. Images are decoded
once per sample and prepared by every stage's own eval transform (``MultiSizeTransform``); when
stages use different sizes, the smaller ones are resized from the largest decode rather than
DCT-downscaled by the JPEG decoder as in training.

The cascade's score for AUC keeps every path's order and maps its decisions onto 0.5:
auto-negatives -> [0, .25), escalated -> [.25, .75) by meta probability around its threshold,
auto-positives -> [.75, 1]. Cost per image is model compute (stage-1 batch time shared by the batch,
plus stage 2+3 time shared by the escalated rows), without data loading; with
``evaluate_all_stages`` stages 2+3 also run on every sample for per-stage metrics and the
"always run stage 2+3" cost.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.cascade.config import CascadeConfig, ExpertConfig, load_cascade_config
from distrib.errors import DataError, DistribError

log = logging.getLogger(__name__)


class MultiSizeTransform:
    """Loader transform: one decode, then each stage size's uint8 centre crop, flattened side by side."""

    def __init__(self, sizes):
        from distrib.data.transforms import ImageTransform

        self.sizes = sorted(set(sizes))
        self.size = max(self.sizes)  # the decoder DCT-downscales toward the largest stage size
        self._prep = {s: ImageTransform(s, train=False, mean_std=None) for s in self.sizes}

    def prepare(self, img):
        import torch

        return torch.cat([self._prep[s].prepare(img).flatten() for s in self.sizes])

    __call__ = prepare

    def view(self, flat, size: int):
        """Flat uint8 rows [B, total] -> the [B, 3, size, size] block prepared for ``size``."""
        off = 0
        for s in self.sizes:
            if s == size:
                return flat[:, off : off + 3 * s * s].reshape(-1, 3, s, s)
            off += 3 * s * s
        raise KeyError(size)


class Stage:
    """A model plus its eval normalization; ``__call__`` takes the flat uint8 batch."""

    def __init__(self, run_dir: str, device):
        from distrib.data.transforms import build_transform, resolve_mean_std
        from distrib.runs import load_run

        self.model, self.cfg, _ = load_run(run_dir)
        self.model.to(device).eval()
        self.size = self.cfg.data.img_size
        self.norm = build_transform(
            None, self.cfg.data, train=False, mean_std=resolve_mean_std(self.cfg.data, self.model)
        )
        self.device = device

    def images(self, multi: MultiSizeTransform, flat):
        return self.norm.batch(multi.view(flat, self.size).to(self.device))  # normalized on the device

    def __call__(self, multi, flat) -> np.ndarray:
        import torch

        from distrib.training.losses import positive_prob

        with torch.inference_mode():
            out = self.model(self.images(multi, flat))
            logits = out["logits"] if isinstance(out, dict) else out
            return positive_prob(logits).float().cpu().numpy()


class Expert:
    """One stage-2 expert: its models + saved alignment -> the meta-model's columns for this expert.

    ``models``: ``folds`` (the K fold models, averaged), ``refit`` (the one model trained on all folds
    by ``embed.inference: refit``, aligned into the same frame) or ``auto`` (refit when the expert's
    alignment records one). ``n_models`` is how many models run per image.
    """

    def __init__(self, spec: ExpertConfig, device, models: str = "auto"):
        from distrib.config import load_config
        from distrib.data.transforms import build_transform, resolve_mean_std
        from distrib.stacking.align import load_alignment
        from distrib.stacking.embed import AlignedExpert, alignment_path

        self.name = spec.name
        align = spec.alignment or str(alignment_path(spec.oof))
        if not Path(align).is_file():
            raise DataError(
                f"alignment file {align} for expert '{spec.name}' not found; it is written by "
                "'distrib embed' next to oof_embeddings.parquet"
            )
        refit = load_alignment(align)[1].get("refit")
        if models == "refit" and not refit:
            raise DataError(
                f"expert_models: refit, but expert '{spec.name}' ({align}) has no refit model; re-run "
                "'distrib embed ... embed.inference=refit' or set expert_models: folds"
            )
        self.inference = "refit" if refit and models != "folds" else "folds"
        if self.inference == "refit":
            runs, align = [refit["run"]], refit["alignment"]
        else:
            runs = spec.runs or load_alignment(align)[1].get("runs", [])
        self.expert = AlignedExpert(runs, align, device=str(device))
        self.n_models = len(self.expert.models)
        cfg = load_config(Path(runs[0]) / "config.yaml")
        self.size = cfg.data.img_size
        self.norm = build_transform(
            None, cfg.data, train=False, mean_std=resolve_mean_std(cfg.data, self.expert.models[0])
        )
        self.device = device
        oof = pd.read_parquet(spec.oof, columns=["label", "prob", "split"])
        oof = oof[oof["split"] == "oof"]
        from distrib.stacking.thresholds import threshold_youden

        self.threshold = threshold_youden(oof["label"].to_numpy(), oof["prob"].to_numpy())  # fit on OOF only

    def __call__(self, multi, flat) -> dict[str, np.ndarray]:
        emb, prob, recon = self.expert(self.norm.batch(multi.view(flat, self.size)))
        cols = {f"{self.name}__prob": prob}
        cols.update({f"{self.name}__emb_{j:03d}": emb[:, j] for j in range(emb.shape[1])})
        if recon is not None:
            cols[f"{self.name}__recon_error"] = recon
        return cols


def resolve_device(name: str):
    """``auto`` / ``cpu`` / ``cuda`` -> a torch.device; ``cuda`` without a visible GPU is a DistribError."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DistribError("cascade device=cuda but no CUDA device is visible; use device: auto or cpu")
    return torch.device(name)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1000.0


def route(stage1_prob: np.ndarray, t_low: float, t_high: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 routing: (decision 0/1/-1, escalate mask). Exactly the rows with t_low <= p < t_high escalate."""
    from distrib.stacking.thresholds import decide

    dec = decide(stage1_prob, t_low, t_high)
    return dec, dec == -1


def cascade_score(stage1_prob, t_low, t_high, meta_prob, meta_threshold) -> np.ndarray:
    """Monotone per path, decisions at 0.5 (see module docstring); NaN meta only where stage 1 decided."""
    p = np.asarray(stage1_prob, dtype=float)
    m = np.asarray(meta_prob, dtype=float)
    dec, esc = route(p, t_low, t_high)
    lo = 0.25 * np.clip(p / max(t_low, 1e-12), 0, 0.999999)
    hi = 0.75 + 0.25 * np.clip((p - t_high) / max(1 - t_high, 1e-12), 0, 1)
    tau = float(meta_threshold)
    mid = np.where(
        m < tau, 0.25 + 0.25 * m / max(tau, 1e-12), 0.5 + 0.25 * np.clip((m - tau) / max(1 - tau, 1e-12), 0, 0.999999)
    )
    return np.where(esc, mid, np.where(dec == 0, lo, hi))


def fit_or_load(
    path: str,
    pred: Path,
    out: Path,
    name: str,
    recall: float,
    spec: float,
    boot: int,
    fit_split=None,
    quiet: bool = False,
):
    """A stage's thresholds: the given thresholds.json, else fit on ``pred`` (val or OOF rows, never test).
    ``quiet``: no log line about the test rows left out (``predict`` repeats the cascade's fit)."""
    from distrib.config import ThresholdConfig
    from distrib.stacking.thresholds import fit_thresholds, load_predictions, select_fit_rows

    if path:
        return json.loads(Path(path).read_text())
    df = load_predictions(pred)
    if fit_split:
        df = select_fit_rows(df, fit_split, str(pred), log_test_rows=not quiet)
    return fit_thresholds(df, ThresholdConfig(recall=recall, specificity=spec, bootstrap=boot), out, name=name)


def run_cascade(cascade_cfg_path: str | Path, split: str, out_dir: str | Path | None = None) -> dict:
    """Stream ``split`` through the cascade; write cascade_predictions.csv, evaluation_results.json, report.md."""
    import torch

    from distrib.data.loader import build_loader
    from distrib.stacking.stack import STAGE1, load_meta, predict_meta

    if split not in ("val", "test"):
        raise DistribError(f"cascade split {split!r}: use val or test (train rows fit the models)")
    cfg: CascadeConfig = load_cascade_config(cascade_cfg_path)
    out = Path(out_dir) if out_dir else Path(cascade_cfg_path).parent / f"cascade_{split}"
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    meta_model, meta = load_meta(cfg.stack.dir)
    needs_stage1 = STAGE1 in meta["features"]  # stack.features included stage1: feed it stage 1's probability
    specs = cfg.experts or [ExpertConfig(name=e["name"], oof=e["path"]) for e in meta["experts"]]
    stage1 = Stage(cfg.stage1.run, device)
    experts = [Expert(s, device, cfg.expert_models) for s in specs]
    # refit experts in use: the K fold models also score every sample, for the folds-vs-refit AUC and cost
    fold_experts = (
        [Expert(s, device, "folds") for s in specs]
        if cfg.evaluate_all_stages and any(e.inference == "refit" for e in experts)
        else []
    )
    shards = cfg.shards or stage1.cfg.data.shards

    th1 = fit_or_load(
        cfg.stage1.thresholds,
        Path(cfg.stage1.run) / "val_predictions.csv",
        out / "stage1",
        "stage1",
        cfg.recall,
        cfg.specificity,
        cfg.bootstrap,
    )
    band = th1["band"]
    if not band["feasible"]:
        log.warning(f"cascade: stage-1 band INFEASIBLE ({band['message']}); every sample goes to stage 2")
    t_low, t_high = (band["t_low"], band["t_high"]) if band["feasible"] else (-np.inf, np.inf)
    th3 = fit_or_load(
        cfg.stack.thresholds,
        Path(cfg.stack.dir) / "meta_predictions.parquet",
        out / "stage3",
        "meta",
        cfg.recall,
        cfg.specificity,
        cfg.bootstrap,
        fit_split="oof",
    )
    tau = th3["single"][cfg.stack.rule]["threshold"]

    multi = MultiSizeTransform([stage1.size] + [e.size for e in experts])
    loader = build_loader(
        shards,
        split,
        None,
        rank=0,
        world_size=1,
        num_workers=cfg.num_workers,
        batch_size=cfg.batch_size,
        epoch=0,
        transform=multi,
        seed=0,
        mode="eval",
    )

    def stage23(flat, p1, which=experts):
        cols = {STAGE1: p1} if needs_stage1 else {}
        for e in which:
            cols.update(e(multi, flat))
        frame = pd.DataFrame(cols)
        return frame, predict_meta(meta_model, meta, frame)

    rows, warm = [], False
    for batch in loader:
        valid = batch["valid"].bool()
        if not valid.any():
            continue
        flat = batch["image"][valid]
        if not warm:  # first-call allocations/lazy init would otherwise bill the first batch
            for which in filter(None, (experts, fold_experts)):
                stage23(flat[:2], stage1(multi, flat[:2]), which)
            warm = True
        p1, ms1 = _timed(lambda: stage1(multi, flat), device)
        dec, esc = route(p1, t_low, t_high)
        n = len(p1)
        meta_p, cost = np.full(n, np.nan), np.full(n, ms1 / n)
        if esc.any():
            (_, mp), ms23 = _timed(lambda: stage23(flat[torch.from_numpy(esc)], p1[esc]), device)
            meta_p[esc] = mp
            cost[esc] += ms23 / int(esc.sum())
        rec = {
            "key": [batch["key"][i] for i in valid.nonzero().flatten().tolist()],
            "group": [batch["group"][i] for i in valid.nonzero().flatten().tolist()],
            "label": batch["label"][valid].numpy(),
            "stage1_prob": p1,
            "stage1_decision": dec,
            "escalated": esc,
            "meta_prob_escalated": meta_p,
            "cost_ms": cost,
            "stage1_cost_ms": np.full(n, ms1 / n),
        }
        if cfg.evaluate_all_stages:
            (frame, mp_all), ms_all = _timed(lambda: stage23(flat, p1), device)
            rec.update(
                {
                    "meta_prob": mp_all,
                    "always23_cost_ms": np.full(n, ms_all / n),
                    **{f"prob_{e.name}": frame[f"{e.name}__prob"].to_numpy() for e in experts},
                }
            )
        if fold_experts:
            (_, mp_folds), ms_folds = _timed(lambda: stage23(flat, p1, fold_experts), device)
            rec.update({"meta_prob_folds": mp_folds, "always23_folds_cost_ms": np.full(n, ms_folds / n)})
        rows.append(pd.DataFrame(rec))
    if loader.skipped:
        log.warning(f"cascade: {loader.skipped} corrupt samples skipped: {loader.report()['errors'][:3]}")
    if not rows:
        raise DataError(f"{shards} yielded no {split} samples; check 'distrib shard-inspect {shards}'")
    df = pd.concat(rows, ignore_index=True)
    df["final_decision"] = np.where(
        df["escalated"], (df["meta_prob_escalated"] >= tau).astype(int), df["stage1_decision"]
    )
    df["cascade_score"] = cascade_score(df["stage1_prob"], t_low, t_high, df["meta_prob_escalated"], tau)
    df.to_csv(out / "cascade_predictions.csv", index=False)

    from distrib.cascade.evaluate import evaluate_cascade
    from distrib.data.index import read_index
    from distrib.data.verify import class_mapping

    results = evaluate_cascade(
        df,
        cfg,
        split,
        out,
        th1,
        th3,
        tau,
        {e.name: e.threshold for e in experts},
        skipped=loader.skipped,
        classes=class_mapping(read_index(shards)),
        runs={"stage1": cfg.stage1.run, **{e.name: e.expert.meta.get("runs", []) for e in experts}},
        models={e.name: {"inference": e.inference, "models_run": e.n_models} for e in experts},
    )
    return results


__all__ = [
    "run_cascade",
    "route",
    "cascade_score",
    "Stage",
    "Expert",
    "MultiSizeTransform",
    "fit_or_load",
    "resolve_device",
]
