"""The stage-3 candidate meta-learners, one interface: fit on rows -> ``MetaModel`` -> P(label=1).

Candidates, simplest first (``SIMPLICITY``; ``auto`` ties go to the earlier one):

- ``best_expert``: one expert's own probability, the floor.
- ``weighted``: Caruana et al. (2004) greedy ensemble selection with replacement over the models'
  logits, as AutoGluon's ``WeightedEnsemble_L2``: start empty, repeatedly add the model whose
  addition gives the highest AUC of the averaged logits, keep the best prefix of that trajectory
  (ties prefer a model already chosen). Weights are the counts / prefix length, non-negative and
  summing to 1. Its first pick is the best single model on the fit rows, and the prefix is the best
  on those rows, so on the rows it was fit on it never scores below the best expert.
- ``logistic``: L2 logistic regression (sklearn ``LogisticRegressionCV``, C by inner grouped CV,
  scored by AUC) on the probabilities' logits plus standardized embedding / reconstruction columns.
- ``lightgbm``: gradient-boosted trees with small-table regularization: monotone-increasing in every
  probability column, feature_fraction, few leaves, L2 on leaf values, early stopping on an inner
  grouped split of its own training rows.

Persisted without pickle: ``meta_model.json`` (kind, input columns, JSON parameters) plus, for
``lightgbm``, LightGBM's own text model ``meta_model.txt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.special import expit, logit

from distrib.atomic import atomic_path, write_json
from distrib.config import StackConfig
from distrib.errors import DataError
from distrib.stacking.thresholds import weighted_auc

SIMPLICITY = ("best_expert", "weighted", "logistic", "lightgbm")  # auto's tie-break order
_CLIP = 1e-6  # probabilities are clipped to [_CLIP, 1 - _CLIP] before the logit


def is_prob(col: str) -> bool:
    """Columns holding a model's P(label=1): each expert's ``__prob`` and ``stage1__prob``."""
    return col.endswith("__prob")


def logits(X: pd.DataFrame | np.ndarray) -> np.ndarray:
    return logit(np.clip(np.asarray(X, dtype=np.float64), _CLIP, 1 - _CLIP))


@dataclass
class MetaModel:
    """A fitted meta-learner: ``kind``, the input ``columns`` it reads, and its JSON ``params``."""

    kind: str
    columns: list[str]
    params: dict = field(default_factory=dict)
    booster: lgb.Booster | None = None
    n_iter: int | None = None  # lightgbm: boosting rounds to use (None = all)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        X = frame[self.columns]
        if self.kind == "lightgbm":
            return self.booster.predict(X, num_iteration=self.n_iter)
        if self.kind in ("weighted", "best_expert"):
            return expit(logits(X) @ np.asarray(self.params["weights"]))
        if self.kind == "logistic":
            Z = _design(X, self.columns)
            Z = (Z - np.asarray(self.params["mean"])) / np.asarray(self.params["scale"])
            return expit(Z @ np.asarray(self.params["coef"]) + self.params["intercept"])
        raise DataError(f"unknown meta-model kind {self.kind!r}; expected one of {SIMPLICITY}")

    def save(self, out: Path) -> dict:
        """Write meta_model.json (+ meta_model.txt for lightgbm); removes a stale meta_model.txt otherwise."""
        spec = {"kind": self.kind, "columns": self.columns, "params": self.params}
        txt = out / "meta_model.txt"
        if self.kind == "lightgbm":
            with atomic_path(txt) as tmp:
                self.booster.save_model(str(tmp), num_iteration=self.n_iter)
            spec["model_file"] = txt.name
        elif txt.exists():
            txt.unlink()
        write_json(out / "meta_model.json", spec)
        return spec


def load_model(d: Path, legacy_columns: list[str] | None = None) -> MetaModel:
    """Read ``save``'s files; a stack dir from before meta_model.json holds only a LightGBM meta_model.txt."""
    spec_path = d / "meta_model.json"
    if not spec_path.is_file():
        return MetaModel(
            "lightgbm", list(legacy_columns or []), booster=lgb.Booster(model_file=str(d / "meta_model.txt"))
        )
    spec = json.loads(spec_path.read_text())
    booster = None
    if spec["kind"] == "lightgbm":
        path = d / spec.get("model_file", "meta_model.txt")
        if not path.is_file():
            raise DataError(
                f"{spec_path} names LightGBM model {path}, which is missing; re-run 'distrib stack --out {d}'"
            )
        booster = lgb.Booster(model_file=str(path))
    if spec["kind"] not in SIMPLICITY:
        raise DataError(f"{spec_path}: unknown meta-model kind {spec['kind']!r}; expected one of {SIMPLICITY}")
    return MetaModel(spec["kind"], spec["columns"], spec.get("params", {}), booster)


# --------------------------------------------------------------------------- the candidates


def fit_best_expert(X: pd.DataFrame, y: np.ndarray, name: str) -> MetaModel:
    """The given expert's probability as it is (weight 1 on its logit)."""
    return MetaModel("best_expert", [name], {"weights": [1.0]})


def caruana(P: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, list[float]]:
    """Greedy selection with replacement over the columns of logits ``P`` by AUC; (weights, trajectory)."""
    n_models = P.shape[1]
    ones = np.ones((1, len(y)))
    total, order, trajectory = np.zeros(len(y)), [], []
    for step in range(size if n_models > 1 else 1):
        scores = np.array([weighted_auc(y, (total + P[:, j]) / (step + 1), ones)[0] for j in range(n_models)])
        best = np.flatnonzero(np.isclose(scores, scores.max(), rtol=0, atol=1e-12))
        used = [j for j in best if j in order]
        pick = int((used or best)[0])
        total += P[:, pick]
        order.append(pick)
        trajectory.append(float(scores[pick]))
    keep = int(np.argmax(trajectory)) + 1  # first index of the best score: the shortest best prefix
    weights = np.bincount(order[:keep], minlength=n_models) / keep
    return weights, trajectory[:keep]


def fit_weighted(X: pd.DataFrame, y: np.ndarray, cfg: StackConfig) -> MetaModel:
    w, traj = caruana(logits(X), y, cfg.ensemble_size)
    return MetaModel("weighted", list(X.columns), {"weights": w.tolist(), "fit_auc_trajectory": traj})


def _design(X: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Probabilities -> logits, every other column as is (standardized by the caller)."""
    Z = np.asarray(X, dtype=np.float64).copy()
    for j, c in enumerate(columns):
        if is_prob(c):
            Z[:, j] = logits(Z[:, j])
    return Z


def fit_logistic(X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, cfg: StackConfig, folds_fn) -> MetaModel:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    cols = list(X.columns)
    scaler = StandardScaler().fit(_design(X, cols))
    Z = scaler.transform(_design(X, cols))
    inner = [
        (tr, te)
        for tr, te in folds_fn(y, groups, min(cfg.inner_folds, len(pd.unique(groups))), cfg.seed + 1)
        if len(np.unique(y[te])) == 2
    ]  # a one-class inner fold has no AUC (tiny tables)
    if not inner:
        raise DataError(
            f"logistic meta-learner: no inner grouped fold of {len(y)} rows holds both classes; "
            "use more groups or stack.meta=weighted"
        )
    clf = LogisticRegressionCV(
        Cs=cfg.logistic_cs,
        l1_ratios=(0.0,),
        cv=inner,
        scoring="roc_auc",
        solver="newton-cholesky",
        max_iter=200,
        random_state=cfg.seed,
        n_jobs=1,
        use_legacy_attributes=False,
    ).fit(Z, y)
    return MetaModel(
        "logistic",
        cols,
        {
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            "coef": np.ravel(clf.coef_).tolist(),
            "intercept": float(np.ravel(clf.intercept_)[0]),
            "C": float(np.ravel(clf.C_)[0]),
        },
    )


def lgb_classifier(cfg: StackConfig, columns: list[str], n_estimators: int | None = None) -> lgb.LGBMClassifier:
    mono = [1 if (cfg.monotone and is_prob(c)) else 0 for c in columns]
    return lgb.LGBMClassifier(
        n_estimators=n_estimators or cfg.n_estimators,
        learning_rate=cfg.learning_rate,
        num_leaves=cfg.num_leaves,
        min_child_samples=cfg.min_child_samples,
        colsample_bytree=cfg.feature_fraction,
        reg_lambda=cfg.lambda_l2,
        monotone_constraints=mono,
        n_jobs=cfg.n_jobs,
        random_state=cfg.seed,
        deterministic=True,
        force_row_wise=True,
        verbose=-1,
    )


def fit_lightgbm(
    X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, cfg: StackConfig, folds_fn, n_estimators: int | None = None
) -> MetaModel:
    """Early stopping watches an inner grouped split of these rows only; a fixed ``n_estimators`` skips it."""
    cols = list(X.columns)
    if n_estimators or cfg.early_stopping_rounds == 0:
        model = lgb_classifier(cfg, cols, n_estimators).fit(X, y)
        return MetaModel("lightgbm", cols, booster=model.booster_, params={"n_estimators": model.n_estimators})
    inner_tr, inner_es = folds_fn(y, groups, min(cfg.inner_folds, len(pd.unique(groups))), cfg.seed + 1)[0]
    model = lgb_classifier(cfg, cols).fit(
        X.iloc[inner_tr],
        y[inner_tr],
        eval_X=(X.iloc[inner_es],),
        eval_y=(y[inner_es],),
        eval_metric="auc",
        callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
    )
    best = int(model.best_iteration_ or cfg.n_estimators)
    return MetaModel("lightgbm", cols, booster=model.booster_, n_iter=best, params={"n_estimators": best})


def fit_candidate(
    kind: str,
    X: pd.DataFrame,
    y: np.ndarray,
    groups: np.ndarray,
    cfg: StackConfig,
    folds_fn,
    n_estimators: int | None = None,
) -> MetaModel:
    """Fit one candidate on (X, y); ``X`` holds exactly the columns that candidate reads."""
    if kind == "best_expert":
        return fit_best_expert(X, y, X.columns[0])
    if kind == "weighted":
        return fit_weighted(X, y, cfg)
    if kind == "logistic":
        return fit_logistic(X, y, groups, cfg, folds_fn)
    return fit_lightgbm(X, y, groups, cfg, folds_fn, n_estimators)


def choose(candidates: dict[str, dict], tie: float) -> str:
    """``auto``: the simplest candidate whose mean CV AUC is within ``tie`` of the best mean."""
    top = max(c["auc_mean"] for c in candidates.values())
    return next(k for k in SIMPLICITY if k in candidates and candidates[k]["auc_mean"] >= top - tie)
