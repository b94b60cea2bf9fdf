"""What the OOF step and the refit model share: one fold model's pre-head features of a split, the val
anchors its alignment is fitted on, and the OOF table's columns (``embed_table``).

``embed.extract_oof`` (K fold models) and ``refit.add_refit`` (one all-folds model) both build their
tables from these, so both tables carry the same columns in the same frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from distrib.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """Features of one split/fold as seen by one fold model (rows in stream order)."""

    keys: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    feats: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    recon: list = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        feats = np.concatenate(self.feats) if self.feats else np.zeros((0, 0))
        probs = np.concatenate(self.probs) if self.probs else np.zeros(0)
        return feats, probs, (np.concatenate(self.recon) if self.recon else None)


def embed_split(model, cfg, split: str, folds: list[int] | None, batch_size: int, limit: int = 0) -> Embedded:
    """Stream ``split`` (``folds`` for train) through ``model``: pre-head features, P(fake), recon error."""
    import torch

    from distrib.data.loader import build_loader
    from distrib.data.transforms import build_transform, resolve_mean_std
    from distrib.training.losses import positive_prob

    transform = build_transform(None, cfg.data, train=False, mean_std=resolve_mean_std(cfg.data, model))
    loader = build_loader(
        cfg.data.shards,
        split,
        folds,
        rank=0,
        world_size=1,
        num_workers=0,
        batch_size=batch_size,
        epoch=0,
        transform=transform,
        seed=cfg.data.seed,
        mode="eval",
    )
    device = next(model.parameters()).device
    has_recon = hasattr(model, "recon_error_stats")  # GenConViT: features end with [mse mean, std, max]
    out, n = Embedded(), 0
    from tqdm.auto import tqdm

    bar = tqdm(
        desc=f"embed fold {cfg.data.fold} {split}",
        unit="img",
        total=limit or None,
        leave=False,
        disable=None,
        dynamic_ncols=True,
    )  # the OOF step streams every split once per fold model: minutes
    with torch.inference_mode(), bar:
        for batch in loader:
            valid = batch["valid"].bool()
            if not valid.any():
                continue
            feats = model.forward_features(batch["image"][valid].to(device))
            probs = positive_prob(model.forward_head(feats))
            idx = valid.nonzero().flatten().tolist()
            out.keys += [batch["key"][i] for i in idx]
            out.groups += [batch["group"][i] for i in idx]
            out.labels += batch["label"][valid].tolist()
            out.feats.append(feats.float().cpu().numpy())
            out.probs.append(probs.float().cpu().numpy())
            if has_recon:
                out.recon.append(feats[:, -3].float().cpu().numpy())
            n += len(idx)
            bar.update(len(idx))
            if limit and n >= limit:
                break
    if loader.skipped:
        log.warning(f"embed: {split} {folds or ''}: {loader.skipped} corrupt samples skipped: {loader.report()}")
    return out


def has_split(shards: str, split: str) -> bool:
    from distrib.data.index import read_index

    return any(s["split"] == split for s in read_index(shards)["shards"])


def anchor_rows(evals: dict, n: int, dim: int) -> np.ndarray:
    """The first ``n`` val samples by key: the same unlabeled samples for every fold model."""
    if "val" not in evals:
        raise DataError(
            "alignment anchors come from the 'val' split, which these shards lack; "
            "shard with 'distrib shard --val VAL.csv'"
        )
    e = evals["val"]
    feats = e.arrays()[0]
    order = np.argsort(np.asarray(e.keys, dtype=object), kind="stable")[:n]
    if len(order) < dim:
        raise DataError(
            f"only {len(order)} anchor samples for embed.dim={dim}: Procrustes needs at least dim "
            f"anchors; raise embed.anchors (now {n}) or lower embed.dim"
        )
    return feats[order]


def embed_table(e: Embedded, emb: np.ndarray, probs, recon, fold: int, split: str, name: str) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "key": e.keys,
            "group": e.groups,
            "label": np.asarray(e.labels, dtype=int),
            "fold": fold,
            "split": split,
            "model": name,
            "prob": np.asarray(probs, dtype=float),
        }
    )
    if recon is not None:
        df["recon_error"] = np.asarray(recon, dtype=float)
    embs = pd.DataFrame(emb.astype(np.float32), columns=[f"emb_{j:03d}" for j in range(emb.shape[1])])
    return pd.concat([df, embs], axis=1)
