"""The experts' OOF tables read and joined into one wide table, and stage 1's probabilities for its rows.

Every check on what a user hands ``distrib stack`` (format, columns, duplicated or missing keys,
probabilities outside [0, 1]) lives here, so the meta-model code sees only a clean table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from distrib.errors import DataError

SHOW = 10  # keys named in an error message
REQUIRED = ("key", "group", "label", "split", "model", "prob")
STAGE1 = "stage1__prob"  # the stage-1 probability column (stack.features: stage1, --stage1 FILE)


def _emb_cols(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if re.fullmatch(r"emb_\d+", c))


def keys_text(values) -> str:
    values = sorted(map(str, values))
    more = f" (+{len(values) - SHOW} more)" if len(values) > SHOW else ""
    return ", ".join(values[:SHOW]) + more


def read_table(path: Path, what: str, fix: str, csv_ok: bool = False) -> pd.DataFrame:
    """A parquet (or, with ``csv_ok``, a .csv) table; a file of another format is a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path} (run {fix})")
    if csv_ok and path.suffix.lower() == ".csv":
        return pd.read_csv(path)
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a CSV or a truncated file
        raise DataError(
            f"{path} is not a readable parquet file ({type(err).__name__}: {str(err)[:80]}); "
            f"{what} must be the parquet written by {fix}"
        ) from None


def check_probs(df: pd.DataFrame, path: Path, col: str = "prob") -> None:
    """``col`` must be a finite probability in [0, 1] on every row; name the rows and the fix otherwise."""
    p = pd.to_numeric(df[col], errors="coerce")
    nan = p.isna().to_numpy()
    if nan.any():
        raise DataError(
            f"{path}: {int(nan.sum())} row(s) have no numeric '{col}' (keys {keys_text(df.loc[nan, 'key'])}); "
            "re-run the step that wrote it, or drop those samples from every expert"
        )
    bad = ((p < 0) | (p > 1)).to_numpy()
    if bad.any():
        raise DataError(
            f"{path}: '{col}' must be P(label=1) in [0, 1], found {float(p[bad].iloc[0]):g} on "
            f"{int(bad.sum())} row(s) (keys {keys_text(df.loc[bad, 'key'])}); divide a 0-100 score by 100, "
            "pass logits through a sigmoid"
        )


def load_experts(paths: list[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """Read one oof_embeddings.parquet per expert and join them on ``key`` into one wide table.

    Columns of the result: key, group, label, split, and per expert ``{name}__prob``,
    ``{name}__emb_NNN``, ``{name}__recon_error``. A key missing from any expert is an error naming it;
    so are a non-parquet file, the same file twice, and a probability that is NaN or outside [0, 1].
    """
    base, experts, seen = None, [], {}
    for path in map(Path, paths):
        if path.resolve() in seen:
            raise DataError(
                f"--oof {path} is given twice (also as {seen[path.resolve()]}); each expert's "
                "oof_embeddings.parquet once"
            )
        seen[path.resolve()] = path
        df = read_table(path, "OOF table", "'distrib embed' or the sweep with tune.embed_best")
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; oof_embeddings.parquet needs {list(REQUIRED)} + emb_*")
        if df["key"].duplicated().any():
            raise DataError(
                f"{path}: duplicated keys {keys_text(df.loc[df['key'].duplicated(), 'key'])}; "
                "each sample must appear exactly once (re-run the OOF merge)"
            )
        check_probs(df, path)
        name = re.sub(r"[^A-Za-z0-9_]", "_", str(df["model"].iloc[0]))
        if any(e["name"] == name for e in experts):
            if base is not None and df.set_index("key")["prob"].reindex(base["key"]).equals(
                base.set_index("key")[f"{name}__prob"]
            ):
                raise DataError(
                    f"{path} holds the same expert ('{name}', identical probabilities) as an earlier "
                    "--oof file; give each expert once"
                )
            name = f"{name}_{len(experts)}"
        embs = _emb_cols(df)
        has_recon = "recon_error" in df.columns
        experts.append(
            {
                "name": name,
                "path": str(path),
                "model": str(df["model"].iloc[0]),
                "emb_dim": len(embs),
                "has_recon": has_recon,
            }
        )
        cols = {"prob": f"{name}__prob", **{c: f"{name}__{c}" for c in embs}}
        if has_recon:
            cols["recon_error"] = f"{name}__recon_error"
        part = df[["key", "group", "label", "split", *cols]].rename(columns=cols)
        if base is None:
            base = part
            continue
        only_new = set(part["key"]) - set(base["key"])
        only_old = set(base["key"]) - set(part["key"])
        if only_new or only_old:
            raise DataError(
                f"experts disagree on samples: {len(only_old)} key(s) missing from {path} "
                f"({keys_text(only_old)}) and {len(only_new)} key(s) only in it ({keys_text(only_new)}); "
                "every expert must be embedded on the same shards"
            )
        merged = base.merge(part, on="key", suffixes=("", "__new"))
        for col in ("group", "label", "split"):
            bad = merged[col].astype(str) != merged[f"{col}__new"].astype(str)
            if bad.any():
                raise DataError(
                    f"{path} disagrees with {experts[0]['path']} on '{col}' for keys "
                    f"{keys_text(merged.loc[bad, 'key'])}; the experts were built from different shards"
                )
        base = merged.drop(columns=[f"{c}__new" for c in ("group", "label", "split")])
    return base.reset_index(drop=True), experts


def load_stage1(paths: list[str | Path], keys: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Stage 1's P(label=1) for every key, from key,prob tables (CSV or parquet; several are concatenated).

    The rows of training samples must be out-of-fold (e.g. the stage-1 fold runs' val_predictions.csv,
    ``data.fold=k``); val/test rows come from the deployed stage-1 model, the one the cascade runs.
    """
    parts = []
    for path in map(Path, paths):
        df = read_table(path, "stage-1 predictions", "'distrib train' (val_predictions.csv)", csv_ok=True)
        missing = [c for c in ("key", "prob") if c not in df.columns]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; --stage1 takes key,prob rows of stage-1 predictions")
        check_probs(df, path)
        parts.append(df[["key", "prob"]].assign(key=lambda d: d["key"].astype(str), source=str(path)))
    df = pd.concat(parts, ignore_index=True)
    dup = df["key"].duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"--stage1: {int(dup.sum())} rows repeat a key ({keys_text(df.loc[dup, 'key'].unique())}, in "
            f"{sorted(df.loc[dup, 'source'].unique())}); give each sample's stage-1 probability once"
        )
    prob = df.set_index("key")["prob"].reindex(keys.astype(str))
    if prob.isna().any():
        raise DataError(
            f"--stage1 {[str(p) for p in paths]} has no probability for {int(prob.isna().sum())} "
            f"sample(s) ({keys_text(keys[prob.isna().to_numpy()])}); it must cover the OOF, val and test rows"
        )
    return prob.to_numpy(dtype=float), [str(p) for p in paths]


def feature_columns(experts: list[dict], sets: list[str]) -> list[str]:
    """Feature names for the feature sets ('prob', 'emb', 'recon', 'stage1'), in a fixed order."""
    cols = []
    for e in experts:
        if "prob" in sets:
            cols.append(f"{e['name']}__prob")
        if "emb" in sets:
            cols += [f"{e['name']}__emb_{i:03d}" for i in range(e["emb_dim"])]
        if "recon" in sets and e["has_recon"]:
            cols.append(f"{e['name']}__recon_error")
    return cols + ([STAGE1] if "stage1" in sets else [])
