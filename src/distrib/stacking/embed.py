"""Leak-free, aligned out-of-fold embeddings from K fold runs -> ``oof_embeddings.parquet``.

    distrib embed --sweep runs/sweep --out runs/sweep/oof_embeddings.parquet
    distrib embed --runs runs/f0 runs/f1 runs/f2 --out oof.parquet embed.dim=64

Fold-k's best model (``distrib.runs.load_run``) embeds, with ``forward_features`` (pre-head; GenConViT's
combined paths + reconstruction statistics) and ``positive_prob``: its held-out fold k (the OOF rows),
the val and test splits, and up to ``embed.fit_samples`` samples of its OWN training folds (for the
PCA only). Batches are streamed from the shards; only feature vectors are kept. The per-fold PCA and
the Procrustes alignment onto fold 0 are described in ``distrib.stacking.align``; the anchors are the first
``embed.anchors`` val samples by key (unlabeled use only). OOF rows keep their one fold model's
aligned embedding; val/test rows average the K aligned embeddings and probabilities. The fitted
alignment is saved next to the parquet (``<stem>_alignment.npz``) so inference applies the same one
(``AlignedExpert``). With ``embed.inference: refit`` one more model, trained on every training fold,
is aligned into the same frame and recorded in that file (``distrib.stacking.refit``). Before writing, ``align.check_oof_table`` verifies exactly-once, leak-free coverage
against the shards' own per-sample metadata.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.atomic import atomic_path
from distrib.config import EmbedConfig
from distrib.errors import DataError, DistribError
from distrib.stacking.align import check_oof_table, fit_alignments, load_alignment, save_alignment
from distrib.stacking.features import Embedded, anchor_rows, embed_split, embed_table, has_split
from distrib.stacking.refit import add_refit

log = logging.getLogger(__name__)


def expected_training_rows(shards: str) -> pd.DataFrame:
    """Ground truth for the merge check: (key, group, label, fold) from every train shard's .json members."""
    from distrib.data.index import plan_split, read_samples

    class _Count:
        def __init__(self):
            self.problems = []

        def note(self, kind, n, msg):
            self.problems.append(msg)

    plan = plan_split(shards, "train", None)
    stats = _Count()
    rows = []
    for s in read_samples(({"url": u} for u in plan.urls), plan.counts, stats):
        meta = json.loads(s["json"]) if "json" in s else {}
        rows.append(
            {
                "key": meta.get("key", s["__key__"]),
                "group": str(meta.get("group", "")),
                "label": int(meta.get("label", int(s.get("cls", b"-1")))),
                "fold": int(meta.get("fold", -1)),
            }
        )
    if stats.problems:
        raise DataError(
            f"cannot read the training shards' metadata for the OOF merge check: {stats.problems[:3]}; "
            "run 'distrib shard-inspect' on the shard dir and re-shard broken files"
        )
    return pd.DataFrame(rows)


def _load_runs(run_dirs: list[str]):
    from distrib.runs import load_run

    runs = []
    for d in run_dirs:
        model, cfg, _ = load_run(d)
        runs.append((str(d), model, cfg))
    folds = sorted(cfg.data.fold for _, _, cfg in runs)
    if folds != list(range(len(runs))):
        raise DistribError(
            f"OOF extraction needs one run per fold 0..{len(runs) - 1}; the runs' data.fold are "
            f"{[c.data.fold for _, _, c in runs]} ({run_dirs})"
        )
    shards = {c.data.shards for _, _, c in runs}
    if len(shards) != 1:
        raise DistribError(f"fold runs were trained on different shards {sorted(shards)}; embed runs of one sweep")
    _check_one_config(runs)
    return sorted(runs, key=lambda r: r[2].data.fold)


def _check_one_config(runs) -> None:
    """One OOF table is one model trained K times: fold runs of different configs (another lr, say) would
    stack a mix under one name. Compare each run's saved resolved config (config.yaml, else the one inside
    best_model.pth) with the first, minus data.fold and the fields a sweep may change on --resume
    (SWEEP_RESUME_SAFE: logging, cadence, later stages)."""
    import dataclasses

    import yaml

    from distrib.config import SWEEP_RESUME_SAFE, allowed_change, config_changes

    def saved(run_dir: str, cfg) -> dict:
        path = Path(run_dir) / "config.yaml"
        return yaml.safe_load(path.read_text()) if path.is_file() else dataclasses.asdict(cfg)

    first_dir, _, first = runs[0]
    base = saved(first_dir, first)
    for run_dir, _, cfg in runs[1:]:
        differ = [
            f"{k}: {a!r} vs {b!r}"
            for k, a, b in config_changes(base, saved(run_dir, cfg))
            if k != "data.fold" and not allowed_change(k, SWEEP_RESUME_SAFE)
        ]
        if differ:
            raise DistribError(
                f"fold runs {first_dir} and {run_dir} were trained with different configs ({'; '.join(differ)}); "
                "embed the fold runs of one config (distrib embed --sweep picks the best config's folds)"
            )


def check_val_anchors(n_val: int, embed_cfg: EmbedConfig, where: str, fix: str = "embed.dim") -> None:
    """The alignment anchors are val images: ``embed.dim`` needs at least that many. Called before a sweep or a
    recipe starts (the shard index or the val manifest gives ``n_val``), not after the fold models are trained."""
    if n_val < embed_cfg.dim:
        raise DataError(
            f"embed.dim={embed_cfg.dim} needs at least that many val images to align the fold models' "
            f"embeddings, but {where} has {n_val}; add val images or set {fix}={max(1, n_val // 2)}"
        )


def extract_oof(run_dirs: list[str], out_path: str | Path, embed_cfg: EmbedConfig) -> pd.DataFrame:
    """Write ``out_path`` (parquet) + its alignment; return the table (see module docstring)."""
    if Path(out_path).suffix != ".parquet":  # the name says the format: no Parquet bytes under .csv
        raise DistribError(f"--out {out_path}: the OOF table is written as Parquet; name it *.parquet")
    import torch

    from distrib.data.index import read_index
    from distrib.data.loader import folds_for

    if embed_cfg.anchors < embed_cfg.dim or embed_cfg.fit_samples < embed_cfg.dim:  # fail before any embedding
        raise DataError(
            f"embed.dim={embed_cfg.dim} needs embed.anchors and embed.fit_samples >= dim (got "
            f"{embed_cfg.anchors}, {embed_cfg.fit_samples}); lower embed.dim or raise them"
        )
    runs = _load_runs(list(run_dirs))
    k = len(runs)
    shards = runs[0][2].data.shards
    n_folds = int(read_index(shards)["folds"])
    if n_folds != k:
        raise DistribError(f"{shards} has {n_folds} folds but {k} fold runs were given; pass one run per fold")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bs = embed_cfg.batch_size
    held, evals, fit_feats, anchor_feats = [], [], [], []
    for i, (run_dir, model, cfg) in enumerate(runs):
        log.info(f"embed: fold model {i + 1}/{k} ({run_dir}) on {device}: train, held-out fold, val/test")
        model.to(device).eval()
        fold = cfg.data.fold
        fit_feats.append(
            embed_split(model, cfg, "train", folds_for(fold, k), bs, embed_cfg.fit_samples).arrays()[0][
                : embed_cfg.fit_samples
            ]
        )
        held.append(embed_split(model, cfg, "train", [fold], bs))
        evals.append({s: embed_split(model, cfg, s, None, bs) for s in ("val", "test") if has_split(shards, s)})
        anchor_feats.append(anchor_rows(evals[-1], embed_cfg.anchors, embed_cfg.dim))
        model.cpu()
    aligns = fit_alignments(fit_feats, anchor_feats, embed_cfg.dim, seed=runs[0][2].train.seed)
    name = runs[0][2].model.name
    parts = [
        embed_table(h, a.transform(h.arrays()[0]), h.arrays()[1], h.arrays()[2], fold, "oof", name)
        for fold, (h, a) in enumerate(zip(held, aligns))
    ]
    for split in evals[0]:
        parts.append(_averaged(split, [e[split] for e in evals], aligns, name))
    df = pd.concat(parts, ignore_index=True)
    check_oof_table(df, expected_training_rows(shards), where=str(out_path))
    out_path = Path(out_path)
    refit = None
    if embed_cfg.inference == "refit":  # before the parquet: a step that checks it sees a complete refit
        refit = add_refit(runs[0][0], out_path, embed_cfg, aligns[0].transform(anchor_feats[0]), name)
    with atomic_path(out_path) as tmp:
        df.to_parquet(tmp, index=False)
    save_alignment(
        alignment_path(out_path),
        aligns,
        {
            "runs": [r[0] for r in runs],
            "model": name,
            "dim": embed_cfg.dim,
            "shards": shards,
            "inference": embed_cfg.inference,
            "refit": refit,
        },
    )
    return df


def alignment_path(parquet: str | Path) -> Path:
    parquet = Path(parquet)
    return parquet.with_name(f"{parquet.stem}_alignment.npz")


def _averaged(split: str, per_fold: list[Embedded], aligns, name: str) -> pd.DataFrame:
    """val/test: the K fold models' aligned embeddings and probabilities, averaged per key."""
    ref = per_fold[0]
    order = [np.argsort(np.asarray(e.keys, dtype=object), kind="stable") for e in per_fold]
    keys = [np.asarray(e.keys, dtype=object)[o] for e, o in zip(per_fold, order)]
    if any(len(kk) != len(keys[0]) or (kk != keys[0]).any() for kk in keys):
        raise DataError(
            f"fold models read different {split} samples (corrupt samples skipped?); "
            "run 'distrib shard-inspect' and fix the shards"
        )
    emb = np.mean([a.transform(e.arrays()[0][o]) for a, e, o in zip(aligns, per_fold, order)], axis=0)
    probs = np.mean([e.arrays()[1][o] for e, o in zip(per_fold, order)], axis=0)
    recon = None if ref.arrays()[2] is None else np.mean([e.arrays()[2][o] for e, o in zip(per_fold, order)], axis=0)
    sorted_ref = Embedded(
        keys=list(keys[0]),
        groups=list(np.asarray(ref.groups, dtype=object)[order[0]]),
        labels=list(np.asarray(ref.labels)[order[0]]),
    )
    return embed_table(sorted_ref, emb, probs, recon, -1, split, name)


class AlignedExpert:
    """Inference (the cascade): K fold models + the saved alignment -> the same features as val/test rows.

    ``AlignedExpert(run_dirs, alignment_file)(images)`` takes a batch already transformed like the runs'
    eval data and returns (aligned embedding [B, dim], mean P(fake) [B], mean recon error [B] or None).
    """

    def __init__(self, run_dirs: list[str], alignment_file: str | Path, device: str = "cpu"):
        from distrib.runs import load_run

        self.alignments, self.meta = load_alignment(alignment_file)
        runs = _load_runs(list(run_dirs)) if len(run_dirs) > 1 else [(run_dirs[0], *load_run(run_dirs[0])[:2])]
        if len(runs) != len(self.alignments):
            raise DistribError(f"{alignment_file} aligns {len(self.alignments)} folds but {len(runs)} runs were given")
        self.models = [m.to(device).eval() for _, m, _ in runs]
        self.device = device

    def __call__(self, images):
        import torch

        from distrib.training.losses import positive_prob

        feats, probs, recon = [], [], []
        with torch.inference_mode():
            for m in self.models:
                f = m.forward_features(images.to(self.device))
                feats.append(f.float().cpu().numpy())
                probs.append(positive_prob(m.forward_head(f)).float().cpu().numpy())
                if hasattr(m, "recon_error_stats"):
                    recon.append(feats[-1][:, -3])
        emb = np.mean([a.transform(f) for a, f in zip(self.alignments, feats)], axis=0)
        return emb, np.mean(probs, axis=0), (np.mean(recon, axis=0) if recon else None)
