"""``embed.inference: refit``: one model of the expert's config on ALL training folds, aligned like a fold model.

AutoGluon's ``refit_full`` idea: the K fold models exist to give leak-free OOF rows for the meta-model;
at inference one model trained on every fold can stand in for them, K times cheaper. ``add_refit``
(called by ``embed.extract_oof``, so by ``distrib embed`` and the sweep's embed step) trains the
fold-0 run's config with ``data.fold=-1`` (every training fold, validation on the 'val' split) into
``<parquet stem>_refit/`` (an existing finished run there is reused, a partial one resumed), then
aligns it into the OOF rows' frame the same way as fold k > 0 (its own PCA on its training samples,
Procrustes onto fold 0's anchors: ``align.align_to_reference``). It writes, before the OOF parquet
itself (so a step that checks the parquet sees a complete refit):

- ``<stem>_refit_alignment.npz``: the refit model's alignment (``runs`` = the refit run dir);
- ``<stem>_refit.parquet``: val/test rows embedded by the refit model alone (same columns as the
  OOF table), so ``stack.fit_stack`` reports the meta-model's AUC with refit experts next to the
  K-fold average (``refit_splits`` in stack_results.json).

The OOF rows, and so the meta-model, are unchanged: refit only changes what runs at inference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.atomic import atomic_path
from distrib.config import EmbedConfig
from distrib.stacking.align import align_to_reference, save_alignment
from distrib.stacking.features import anchor_rows, embed_split, embed_table, has_split
from distrib.stacking.tables import load_experts

log = logging.getLogger(__name__)


def refit_paths(parquet: str | Path) -> dict[str, Path]:
    """Where a refit expert's run dir, val/test table and alignment live, next to the OOF parquet."""
    p = Path(parquet).resolve()
    return {
        "run": p.with_name(f"{p.stem}_refit"),
        "table": p.with_name(f"{p.stem}_refit.parquet"),
        "alignment": p.with_name(f"{p.stem}_refit_alignment.npz"),
    }


def train_refit(fold_run: str | Path, out_dir: str | Path) -> str:
    """Train ``fold_run``'s config on every training fold (``data.fold=-1``) into ``out_dir``; reuse a finished one."""
    from distrib.config import load_config
    from distrib.runs import find_checkpoint
    from distrib.training.trainer import run

    out_dir = Path(out_dir)
    if (out_dir / "best_model.pth").is_file() and (out_dir / "evaluation_results.json").is_file():
        log.info(f"embed: refit run {out_dir} is finished; reusing it")
        return str(out_dir)
    cfg = load_config(Path(fold_run) / "config.yaml", ["data.fold=-1"])
    log.info(f"embed: training the refit model (all training folds) into {out_dir}")
    run(cfg, out_dir, resume=find_checkpoint(out_dir) is not None)
    return str(out_dir)


def add_refit(fold_run: str, parquet: str | Path, embed_cfg: EmbedConfig, reference: np.ndarray, name: str) -> dict:
    """Train/reuse, embed and align the refit model; write its table and alignment; return their paths.

    ``reference``: the shared anchors in the reference frame (fold 0's aligned anchor embedding).
    """
    import torch

    from distrib.runs import load_run

    paths = refit_paths(parquet)
    run_dir = train_refit(fold_run, paths["run"])
    model, cfg, _ = load_run(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    bs, shards = embed_cfg.batch_size, cfg.data.shards
    fit = embed_split(model, cfg, "train", None, bs, embed_cfg.fit_samples).arrays()[0][: embed_cfg.fit_samples]
    evals = {s: embed_split(model, cfg, s, None, bs) for s in ("val", "test") if has_split(shards, s)}
    align = align_to_reference(
        fit, anchor_rows(evals, embed_cfg.anchors, embed_cfg.dim), reference, embed_cfg.dim, seed=cfg.train.seed
    )
    model.cpu()
    parts = [
        embed_table(e, align.transform(e.arrays()[0]), e.arrays()[1], e.arrays()[2], -1, s, name)
        for s, e in evals.items()
    ]
    df = pd.concat(parts, ignore_index=True)
    with atomic_path(paths["table"]) as tmp:
        df.to_parquet(tmp, index=False)
    save_alignment(
        paths["alignment"],
        [align],
        {"runs": [run_dir], "model": name, "dim": embed_cfg.dim, "shards": shards, "refit_of": str(fold_run)},
    )
    log.info(f"embed: refit model aligned (Procrustes residual {align.residual:.3f} vs fold 0's anchors)")
    return {
        "run": run_dir,
        "table": str(paths["table"]),
        "alignment": str(paths["alignment"]),
        "residual": float(align.residual),
    }


def refit_table(experts: list[dict]) -> pd.DataFrame | None:
    """The val/test rows of every expert's refit model as one wide table (``stack.load_experts``'s columns),
    or None unless every expert was embedded with ``embed.inference: refit``."""
    tables = [refit_paths(e["path"])["table"] for e in experts]
    if not all(t.is_file() for t in tables):
        return None
    table, refit = load_experts(tables)
    rename = {}
    for e, r in zip(experts, refit):  # the same expert names as the OOF tables (load_experts names by model)
        if e["name"] != r["name"]:
            rename.update({c: e["name"] + c[len(r["name"]) :] for c in table.columns if c.startswith(r["name"] + "__")})
    return table.rename(columns=rename)
