"""Manifest reading and validation for the shard writer: columns, labels, keys, images, group K-folds.

Everything here runs before a single shard byte is written, so bad input fails with a message that
names the file, the row and the fix instead of leaving a half-written shard directory.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from distrib.errors import DataError

REQUIRED = ("path", "label")
BINARY_NAMES = {"real": 0, "fake": 1}  # name labels 'real'/'fake' keep label 1 = manipulated
_INT = re.compile(r"^-?\d+$")


def read_manifest(csv_path, split: str) -> list[dict]:
    """Rows of one manifest as dicts: split, csv, row (1-based data row), path (absolute), source_path,
    label (raw text), group (defaults to the path)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{split} manifest {csv_path} does not exist; pass an existing CSV with columns path,label[,group]")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        for col in REQUIRED:
            if col not in cols:
                raise DataError(f"{csv_path}: missing column '{col}' (found {cols or 'no header'}); "
                                "the first line must be a header with columns path,label[,group]")
        reader.fieldnames = cols
        rows = []
        for i, rec in enumerate(reader, start=1):
            src = (rec.get("path") or "").strip()
            label = (rec.get("label") or "").strip()
            if not src or not label:
                raise DataError(f"{csv_path} row {i}: empty {'path' if not src else 'label'}; "
                                "every row needs a path and a label")
            p = Path(src)
            full = p if p.is_absolute() else csv_path.parent / p
            group = (rec.get("group") or "").strip() or src
            rows.append({"split": split, "csv": str(csv_path), "row": i, "path": str(full),
                         "source_path": src, "label": label, "group": group})
    if not rows:
        raise DataError(f"{csv_path}: the manifest has a header but no rows; add one row per image "
                        "(path,label[,group])")
    return rows


def make_key(source_path: str) -> str:
    """A WebDataset-safe key: no dots (webdataset splits the extension at the first dot) or slashes."""
    stem = source_path.lstrip("/\\")
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", stem)
    stem = re.sub(r"[/\\]+", "__", stem)
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _where(r: dict) -> str:
    return f"{r['csv']} row {r['row']}"


def resolve_labels(rows: list[dict]) -> dict[str, str]:
    """Map raw labels to ids in place (``r['label_id']``); returns classes {id: name}.

    Integer labels must be 0..C-1; names are numbered from the train split ('real' -> 0, 'fake' -> 1,
    otherwise sorted). A val/test label that train never has is an unknown label.
    """
    is_int = [bool(_INT.match(r["label"])) for r in rows]
    if any(is_int) and not all(is_int):
        bad = rows[is_int.index(False)] if is_int[0] else rows[is_int.index(True)]
        raise DataError(f"{_where(bad)}: label {bad['label']!r} mixes integer labels and class names; "
                        "use only integers 0..C-1 or only class names in every manifest")
    train = [r for r in rows if r["split"] == "train"]
    if all(is_int):
        known = sorted({int(r["label"]) for r in train})
        if known != list(range(len(known))):
            bad = next(r for r in train if int(r["label"]) < 0 or int(r["label"]) >= len(known))
            raise DataError(f"{_where(bad)}: unknown label {bad['label']}; integer labels must be 0..C-1 "
                            f"without gaps (train has {known}); renumber the labels")
        names = {i: ("real", "fake")[i] if len(known) == 2 else str(i) for i in known}
        ids = {str(i): i for i in known}
        for r in rows:  # normalise '01' and friends
            r["label"] = str(int(r["label"]))
    else:
        found = sorted({r["label"] for r in train})
        if set(found) <= set(BINARY_NAMES):
            ids = {n: BINARY_NAMES[n] for n in found}
        else:
            ids = {n: i for i, n in enumerate(found)}
        names = {i: n for n, i in ids.items()}
    for r in rows:
        if r["label"] not in ids:
            raise DataError(f"{_where(r)}: unknown label {r['label']!r}; the train manifest only has "
                            f"{sorted(ids)}; fix the label or add that class to the train manifest")
        r["label_id"] = ids[r["label"]]
    return {str(i): n for i, n in sorted(names.items())}


def assign_keys_and_check(rows: list[dict]) -> None:
    """Give every row its key; duplicate keys and groups spanning splits are errors."""
    seen: dict[str, dict] = {}
    for r in rows:
        r["key"] = make_key(r["source_path"])
        if r["key"] in seen:
            first = seen[r["key"]]
            raise DataError(f"duplicate key {r['key']!r}: {_where(first)} ({first['source_path']}) and "
                            f"{_where(r)} ({r['source_path']}); every image must appear once across all "
                            "manifests and paths must differ in more than dots/punctuation; remove or rename one")
        seen[r["key"]] = r
    split_of: dict[str, dict] = {}
    for r in rows:
        first = split_of.setdefault(r["group"], r)
        if first["split"] != r["split"]:
            raise DataError(f"group {r['group']!r} appears in {first['split']} ({_where(first)}) and "
                            f"{r['split']} ({_where(r)}); a source must stay in one split, or the "
                            "held-out metrics leak; move all its rows to one manifest")


def check_image(path: str) -> str | None:
    """None if the image decodes, else the reason. JPEGs decode at 1/8 scale (draft): fast, still
    reading the whole entropy-coded stream, so truncation is caught."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # PIL raises many types for undecodable data
        return f"unreadable ({type(e).__name__}: {e})"


def check_images(paths: list[str]) -> list[tuple[int, str]]:
    """(index, reason) for each bad image among ``paths``; picklable for a process pool."""
    return [(i, why) for i, p in enumerate(paths) if (why := check_image(p)) is not None]


def raise_bad_images(rows: list[dict], bad: list[tuple[int, str]]) -> None:
    if not bad:
        return
    lines = [f"  {_where(rows[i])}: {rows[i]['path']} is {why}" for i, why in bad[:5]]
    more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise DataError(f"{len(bad)} image(s) cannot be read:\n" + "\n".join(lines) + more +
                    "\nfix the paths (relative paths are relative to the manifest's folder) or drop those rows")


def assign_folds(train: list[dict], folds: int, seed: int) -> None:
    """StratifiedGroupKFold fold per train row (``r['fold']``); no group lands in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold
    groups = [r["group"] for r in train]
    n_groups = len(set(groups))
    if n_groups < folds:
        raise DataError(f"{train[0]['csv']}: {n_groups} group(s) but folds={folds}; every fold needs "
                        f"whole groups, so use --folds {max(2, n_groups)} or fewer, or add groups")
    y = np.array([r["label_id"] for r in train])
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, idx) in enumerate(cv.split(np.zeros(len(train)), y, groups)):
        for i in idx:
            train[i]["fold"] = k
    sizes = np.bincount([r["fold"] for r in train], minlength=folds)
    if (sizes == 0).any():
        raise DataError(f"{train[0]['csv']}: fold {int(np.argmin(sizes))} got no rows (groups are too "
                        f"uneven for {folds} folds); use fewer folds or split the largest groups")
