"""Sanity numbers for the demo dataset: a colour-histogram leak check and a residual-feature baseline.

The leak check must stay near chance (AUC < 0.65): if colour statistics alone separate the classes,
every later model number measures a data-building artefact instead of manipulation detection.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from distrib.errors import DataError

LEAK_AUC_LIMIT = 0.65


def _load(data_dir: Path) -> list[dict]:
    rows = []
    for split in ("train", "val", "test"):
        path = data_dir / f"{split}_manifest.csv"
        if not path.exists():
            raise DataError(f"{path} is missing; build the dataset with 'distrib data demo --out {data_dir}'")
        with open(path, newline="") as f:
            rows += [{**r, "split": split, "label": int(r["label"])} for r in csv.DictReader(f)]
    kinds = data_dir / "manipulations.csv"
    if kinds.exists():
        with open(kinds, newline="") as f:
            kind_of = {r["path"]: r["kind"] for r in csv.DictReader(f)}
        for r in rows:
            r["kind"] = kind_of.get(r["path"], "unknown")
    return rows


def _image(data_dir: Path, rel: str) -> np.ndarray:
    p = Path(rel)
    return np.asarray(Image.open(p if p.is_absolute() else data_dir / p).convert("RGB"), dtype=np.float32)


def colour_histogram_features(img: np.ndarray, bins: int = 16) -> np.ndarray:
    """Per-channel histograms plus channel means and spreads: colour only, no spatial structure."""
    hists = [np.histogram(img[..., c], bins=bins, range=(0, 256))[0] / img[..., c].size for c in range(3)]
    return np.concatenate(hists + [img.mean(axis=(0, 1)) / 255, img.std(axis=(0, 1)) / 255])


def residual_features(img: np.ndarray) -> np.ndarray:
    """Hand-crafted high-pass statistics: residual spread and tails, 8x8 JPEG-grid energy,
    2-periodic (checkerboard) energy, and how uneven residual energy is across the tile."""
    g = img.mean(axis=2)
    dx, dy = np.diff(g, axis=1), np.diff(g, axis=0)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    feats = []
    for r in (dx, dy, lap):
        a = np.abs(r)
        feats += [
            r.std(),
            a.mean(),
            np.percentile(a, 90),
            np.percentile(a, 99),
            ((r - r.mean()) ** 4).mean() / (r.var() ** 2 + 1e-6),
        ]
    # JPEG grid: differences across 8-pixel block borders vs inside blocks (aligned and shifted grids).
    cols = np.abs(dx).mean(axis=0)
    feats += [cols[7::8].mean() / (cols.mean() + 1e-6)] + [cols[s::8].mean() / (cols.mean() + 1e-6) for s in range(7)]
    yy, xx = np.mgrid[0 : lap.shape[0], 0 : lap.shape[1]]
    feats += [
        np.abs((lap * np.where((yy + xx) % 2 == 0, 1, -1)).mean()),
        np.abs(lap[::2, ::2]).mean() / (np.abs(lap[1::2, 1::2]).mean() + 1e-6),
    ]
    h, w = lap.shape
    blocks = np.abs(lap[: h - h % 16, : w - w % 16]).reshape(h // 16, 16, w // 16, 16).mean(axis=(1, 3))
    feats += [blocks.std() / (blocks.mean() + 1e-6), blocks.max() / (blocks.min() + 1e-6)]
    return np.asarray(feats, dtype=np.float64)


def _lgbm(seed: int):
    import lightgbm as lgb

    return lgb.LGBMClassifier(
        n_estimators=150,
        learning_rate=0.05,
        num_leaves=15,
        min_child_samples=10,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        random_state=seed,
        n_jobs=1,
        verbose=-1,
    )


def histogram_leak_check(data_dir, folds: int = 5, seed: int = 0) -> dict:
    """Grouped-CV out-of-fold AUC of a LightGBM on colour histograms over every tile.

    ``passed`` is True when the AUC stays below LEAK_AUC_LIMIT (near chance).
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    data_dir = Path(data_dir)
    rows = _load(data_dir)
    X = np.stack([colour_histogram_features(_image(data_dir, r["path"])) for r in rows])
    y = np.array([r["label"] for r in rows])
    groups = np.array([r["group"] for r in rows])
    n_groups = len(set(groups))
    k = min(folds, n_groups)
    if k < 2:
        raise DataError(f"{data_dir}: {n_groups} group(s); the leak check needs at least 2")
    oof = np.zeros(len(rows))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for tr, te in cv.split(X, y, groups):
        oof[te] = _lgbm(seed).fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    auc = float(roc_auc_score(y, oof))
    return {
        "check": "colour_histogram_lightgbm",
        "auc": round(auc, 4),
        "limit": LEAK_AUC_LIMIT,
        "passed": auc < LEAK_AUC_LIMIT,
        "n": len(rows),
        "groups": n_groups,
        "folds": k,
    }


def residual_reference(data_dir, seed: int = 0) -> dict:
    """Test AUC of LightGBM on residual features, trained on train+val: the bar a CNN should beat.

    Also reports the test AUC per manipulation kind (all real test tiles vs that kind).
    """
    from sklearn.metrics import roc_auc_score

    data_dir = Path(data_dir)
    rows = _load(data_dir)
    X = np.stack([residual_features(_image(data_dir, r["path"])) for r in rows])
    y = np.array([r["label"] for r in rows])
    fit = np.array([r["split"] != "test" for r in rows])
    prob = _lgbm(seed).fit(X[fit], y[fit]).predict_proba(X[~fit])[:, 1]
    y_test = y[~fit]
    result = {
        "check": "residual_features_lightgbm",
        "test_auc": round(float(roc_auc_score(y_test, prob)), 4),
        "n_fit": int(fit.sum()),
        "n_test": int((~fit).sum()),
        "per_kind": {},
    }
    kinds = np.array([r.get("kind", "unknown") for r in rows])[~fit]
    for kind in sorted(set(kinds) - {"none", "unknown"}):
        sel = (kinds == kind) | (y_test == 0)
        result["per_kind"][str(kind)] = round(float(roc_auc_score(y_test[sel], prob[sel])), 4)
    return result
