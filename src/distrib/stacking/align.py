"""Cross-fold embedding alignment (PCA + orthogonal Procrustes) and the OOF merge checks.

The coordinate problem: K fold models are trained separately, so feature j of fold 0 and feature j
of fold 1 mean different things, and stacking their raw embeddings in one table is meaningless.
The method used here, per fold k:

1. Projection. Fit a PCA to ``embed.dim`` components on features of fold k's OWN training folds
   (never its held-out fold, never val/test, never labels): ``z = (f - mean_k) @ W_k.T``.
2. Alignment. Embed one shared, unlabeled anchor set with every fold model and project it with each
   fold's PCA, giving ``A_k`` (n_anchors x dim). Fold 0 is the reference. For k > 0 solve the
   orthogonal Procrustes problem on centred anchors,
   ``R_k = argmin_{R: R^T R = I} || (A_k - a_k) R - (A_0 - a_0) ||_F``
   (``scipy.linalg.orthogonal_procrustes``, closed form from an SVD), and map every projected row by
   ``z -> (z - a_k) R_k + a_0``. R_0 = I. A rotation/reflection keeps distances inside each fold's
   space intact (no label information is used and nothing is rescaled), it only changes axes so
   dimension j means the same thing for every fold.
3. Out-of-fold rows are embedded by the one model that never saw them, then aligned; val/test rows
   are embedded by all K models, aligned, and averaged.
4. ``embed.inference: refit``: one more model trained on all folds gets its own PCA (on its training
   samples) and a Procrustes rotation onto the same fold-0 anchors (``align_to_reference``), so at
   inference it stands in for the K fold models in the same coordinates.

``FoldAlignment.transform`` applies steps 1-2 to new features, so inference (the cascade) uses the
exact alignment fitted at training time; ``save_alignment``/``load_alignment`` persist it as .npz.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.atomic import atomic_path
from distrib.errors import DataError

SHOW = 10  # offending keys named in an error message


@dataclass
class FoldAlignment:
    """Projection of one fold model's features into the shared (reference-fold) coordinate frame."""

    fold: int
    mean: np.ndarray  # [D] feature mean of the PCA fit
    components: np.ndarray  # [dim, D] PCA axes
    rotation: np.ndarray  # [dim, dim] Procrustes rotation onto the reference fold
    src_center: np.ndarray  # [dim] anchor mean in this fold's projected space
    ref_center: np.ndarray  # [dim] anchor mean in the reference fold's projected space
    residual: float = 0.0  # relative Frobenius error of the anchor fit (0 = perfect alignment)

    def project(self, feats: np.ndarray) -> np.ndarray:
        """Features [N, D] -> this fold's own PCA coordinates [N, dim] (before alignment)."""
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.mean.shape[0]:
            raise DataError(
                f"fold {self.fold} alignment expects features of shape [N, {self.mean.shape[0]}], "
                f"got {list(feats.shape)}; embed with the same fold model the alignment was fit for"
            )
        return (feats - self.mean) @ self.components.T

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """Features [N, D] -> aligned coordinates [N, dim] in the reference fold's frame."""
        return (self.project(feats) - self.src_center) @ self.rotation + self.ref_center


def fit_projection(feats: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unsupervised PCA on training-fold features: returns (mean [D], components [dim, D])."""
    from sklearn.decomposition import PCA

    feats = np.asarray(feats, dtype=np.float64)
    n, d = feats.shape
    if dim > min(n, d):
        raise DataError(
            f"cannot project to embed.dim={dim}: only {n} training-fold samples with {d} features; "
            f"set embed.dim <= {min(n, d)} or raise embed.fit_samples / use more data"
        )
    pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(feats)
    return pca.mean_.copy(), pca.components_.copy()


def fit_rotation(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Orthogonal Procrustes on centred anchors: (R, source_center, target_center, relative residual)."""
    from scipy.linalg import orthogonal_procrustes

    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2:
        raise DataError(f"anchor embeddings must have equal 2-D shapes, got {source.shape} and {target.shape}")
    if source.shape[0] < 2:
        raise DataError("Procrustes alignment needs at least 2 anchor samples; raise embed.anchors")
    mu_s, mu_t = source.mean(0), target.mean(0)
    rot, _ = orthogonal_procrustes(source - mu_s, target - mu_t)
    fit = (source - mu_s) @ rot
    denom = np.linalg.norm(target - mu_t) or 1.0
    residual = float(np.linalg.norm(fit - (target - mu_t)) / denom)
    return rot, mu_s, mu_t, residual


def fit_alignments(
    train_feats: list[np.ndarray], anchor_feats: list[np.ndarray], dim: int, seed: int = 0
) -> list[FoldAlignment]:
    """One FoldAlignment per fold; fold 0's frame is the reference.

    ``train_feats[k]``: fold-k model features of samples from fold k's training folds (PCA fit).
    ``anchor_feats[k]``: fold-k model features of the shared anchor set (same samples, same order).
    """
    if len(train_feats) != len(anchor_feats) or not train_feats:
        raise DataError(
            f"need features for every fold: {len(train_feats)} training sets, {len(anchor_feats)} anchor sets"
        )
    projections = [fit_projection(f, dim, seed) for f in train_feats]
    anchors = [(np.asarray(a, dtype=np.float64) - m) @ c.T for a, (m, c) in zip(anchor_feats, projections)]
    out = []
    for k, ((mean, comps), a) in enumerate(zip(projections, anchors)):
        rot, mu_s, mu_t, res = fit_rotation(a, anchors[0])
        out.append(FoldAlignment(k, mean, comps, rot, mu_s, mu_t, res))
    return out


def align_to_reference(
    train_feats: np.ndarray, anchor_feats: np.ndarray, reference: np.ndarray, dim: int, seed: int = 0, fold: int = -1
) -> FoldAlignment:
    """One more model (the refit on all folds) into the fold models' frame, exactly like fold k > 0.

    ``reference``: the anchors in the reference frame (fold 0's ``transform`` of its anchor features).
    """
    mean, comps = fit_projection(train_feats, dim, seed)
    rot, mu_s, mu_t, res = fit_rotation((np.asarray(anchor_feats, dtype=np.float64) - mean) @ comps.T, reference)
    return FoldAlignment(fold, mean, comps, rot, mu_s, mu_t, res)


def save_alignment(path: str | Path, alignments: list[FoldAlignment], meta: dict | None = None) -> Path:
    """Persist fold alignments (+ JSON metadata, e.g. the run dirs) to one .npz, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for a in alignments:
        for name in ("mean", "components", "rotation", "src_center", "ref_center"):
            arrays[f"fold{a.fold}_{name}"] = getattr(a, name)
    info = {"folds": [a.fold for a in alignments], "residuals": [a.residual for a in alignments], **(meta or {})}
    arrays["meta_json"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def load_alignment(path: str | Path) -> tuple[list[FoldAlignment], dict]:
    """Read back ``save_alignment``'s file: (alignments in fold order, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"alignment file not found: {path}; run 'distrib embed' to create it next to the parquet")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta_json"]).decode())
        out = []
        for k, res in zip(meta["folds"], meta["residuals"]):
            out.append(
                FoldAlignment(
                    k, *(z[f"fold{k}_{n}"] for n in ("mean", "components", "rotation", "src_center", "ref_center")), res
                )
            )
    return out, meta


def average_aligned(per_fold_feats: list[np.ndarray], alignments: list[FoldAlignment]) -> np.ndarray:
    """New samples embedded by all K fold models -> mean of their aligned embeddings [N, dim]."""
    if len(per_fold_feats) != len(alignments):
        raise DataError(f"got features from {len(per_fold_feats)} fold models but {len(alignments)} alignments")
    return np.mean([a.transform(f) for a, f in zip(alignments, per_fold_feats)], axis=0)


def _keys(values) -> str:
    values = list(values)
    more = f" ... and {len(values) - SHOW} more" if len(values) > SHOW else ""
    return ", ".join(map(str, values[:SHOW])) + more


def check_oof_table(df: pd.DataFrame, expected: pd.DataFrame, where: str = "OOF table") -> None:
    """Raise DataError unless ``df``'s 'oof' rows cover ``expected`` exactly once, leak-free.

    ``expected`` holds the ground truth from the shards (key, group, label, fold). Checked: no
    duplicated key, no missing or unknown key, each row predicted by the model of the sample's own
    held-out fold (so the model never saw it), labels and groups match, no group in two folds, and
    val/test keys appear once per split.
    """
    need = {"key", "group", "label", "fold", "split"}
    if missing_cols := need - set(df.columns):
        raise DataError(f"{where} lacks columns {sorted(missing_cols)}")
    oof = df[df["split"] == "oof"]
    dup = oof["key"][oof["key"].duplicated(keep=False)].unique()
    if len(dup):
        raise DataError(
            f"{where}: {len(dup)} training samples appear more than once: {_keys(dup)}; "
            "each fold run must embed only its own held-out fold"
        )
    exp = expected.drop_duplicates("key").set_index("key")
    got = oof.set_index("key")
    missing = exp.index.difference(got.index)
    if len(missing):
        raise DataError(
            f"{where}: {len(missing)} training samples have no out-of-fold row: {_keys(missing)}; "
            "check the loader's skipped-sample report and that every fold has a run dir"
        )
    extra = got.index.difference(exp.index)
    if len(extra):
        raise DataError(f"{where}: {len(extra)} rows are not training samples in the shard index: {_keys(extra)}")
    got = got.loc[exp.index]
    wrong_fold = exp.index[(got["fold"].astype(int).to_numpy() != exp["fold"].astype(int).to_numpy())]
    if len(wrong_fold):
        raise DataError(
            f"{where}: {len(wrong_fold)} samples were predicted by a model that trained on them "
            f"(row fold != sample's held-out fold): {_keys(wrong_fold)}"
        )
    bad_label = exp.index[got["label"].astype(int).to_numpy() != exp["label"].astype(int).to_numpy()]
    if len(bad_label):
        raise DataError(f"{where}: {len(bad_label)} labels differ from the shard index/manifest: {_keys(bad_label)}")
    bad_group = exp.index[got["group"].astype(str).to_numpy() != exp["group"].astype(str).to_numpy()]
    if len(bad_group):
        raise DataError(f"{where}: {len(bad_group)} groups differ from the shard index/manifest: {_keys(bad_group)}")
    folds_per_group = oof.groupby("group")["fold"].nunique()
    crossing = folds_per_group.index[folds_per_group > 1]
    if len(crossing):
        raise DataError(
            f"{where}: {len(crossing)} groups cross folds (a group leak): {_keys(crossing)}; "
            "re-shard with 'distrib shard' so folds are group-aware"
        )
    for split in ("val", "test"):
        rows = df[df["split"] == split]
        dup = rows["key"][rows["key"].duplicated(keep=False)].unique()
        if len(dup):
            raise DataError(f"{where}: {len(dup)} {split} samples appear more than once: {_keys(dup)}")
        shared = sorted(set(rows["group"].astype(str)) & set(oof["group"].astype(str)))
        if shared:
            raise DataError(
                f"{where}: {len(shared)} groups are in both the training folds and {split}: "
                f"{_keys(shared)}; rebuild the manifests so no group spans two splits"
            )
