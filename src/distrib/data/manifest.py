"""Manifest reading and validation for the shard writer: columns, labels, keys, images, group K-folds.

Everything here runs before a single shard byte is written, so bad input fails with a message that
names the file, the row and the fix instead of leaving a half-written shard directory.
"""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import numpy as np

from distrib.errors import DataError

REQUIRED = ("path", "label")
COLUMNS = ("path", "label", "group")
BINARY_NAMES = {"real": 0, "fake": 1}  # the one name pair mapped without --positive: label 1 = manipulated
# unknown columns that look like a grouping: refused when there is no 'group' column, never ignored
GROUP_LIKE = {
    "groupid",
    "groups",
    "grp",
    "video",
    "videoid",
    "videoname",
    "source",
    "sourceid",
    "src",
    "clip",
    "clipid",
    "subject",
    "subjectid",
    "identity",
    "person",
    "personid",
    "speaker",
    "scene",
    "sequence",
    "seq",
    "origin",
    "original",
    "movie",
    "film",
    "camera",
    "session",
}
_INT = re.compile(r"^-?\d+$")


def _check_columns(csv_path: Path, raw: list) -> None:
    """Columns are matched exactly: near-misses of path/label/group and group-like names are errors."""
    cols = [c for c in raw if c]
    for c in cols:
        near = c.strip().lower()
        if c not in COLUMNS and near in COLUMNS:
            raise DataError(
                f"{csv_path}: column {c!r} must be spelled exactly {near!r} (lower case, no spaces); "
                f"rename it in the header line"
            )
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise DataError(
            f"{csv_path}: missing column '{missing[0]}' (found {cols or 'no header'}); "
            "the first line must be a header with columns path,label[,group]"
        )
    if "group" not in cols:
        grouping = [c for c in cols if re.sub(r"[^a-z]", "", c.lower()) in GROUP_LIKE]
        if grouping:
            raise DataError(
                f"{csv_path}: column {grouping[0]!r} looks like a group id, but only a column named "
                "exactly 'group' is read (without it every image is its own group and frames of one "
                f"source cross folds); rename {grouping[0]!r} to 'group', or drop the column"
            )


def read_manifest(csv_path, split: str) -> list[dict]:
    """Rows of one manifest as dicts: split, csv, row (1-based data row), path (absolute), source_path,
    label (raw text), group (defaults to the path). UTF-8, with or without a BOM (Excel's 'CSV UTF-8')."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(
            f"{split} manifest {csv_path} does not exist; pass an existing CSV with columns path,label[,group]"
        )
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            _check_columns(csv_path, list(reader.fieldnames or []))
            records = list(reader)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{csv_path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "save it as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f latin1 -t utf-8) and re-run"
        ) from None
    rows = []
    for i, rec in enumerate(records, start=1):
        src = (rec.get("path") or "").strip()
        label = (rec.get("label") or "").strip()
        if not src or not label:
            raise DataError(
                f"{csv_path} row {i}: empty {'path' if not src else 'label'}; every row needs a path and a label"
            )
        p = Path(src)
        full = p if p.is_absolute() else csv_path.parent / p
        group = (rec.get("group") or "").strip() or src
        rows.append(
            {
                "split": split,
                "csv": str(csv_path),
                "row": i,
                "path": str(full),
                "source_path": src,
                "label": label,
                "group": group,
            }
        )
    if not rows:
        raise DataError(
            f"{csv_path}: the manifest has a header but no rows; add one row per image (path,label[,group])"
        )
    return rows


def make_key(source_path: str) -> str:
    """A WebDataset-safe key: no dots (webdataset splits the extension at the first dot) or slashes."""
    stem = source_path.lstrip("/\\")
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", stem)
    stem = re.sub(r"[/\\]+", "__", stem)
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _where(r: dict) -> str:
    return f"{r['csv']} row {r['row']}"


def _binary_check(train: list[dict], key) -> dict[str, list[dict]]:
    """Train rows by class key; more or fewer than two classes is an error naming the odd rows."""
    by: dict[str, list[dict]] = {}
    for r in train:
        by.setdefault(key(r), []).append(r)
    if len(by) > 2:
        rare = min(by.values(), key=len)[0]
        seen = ", ".join(f"{by[k][0]['label']!r} ({len(v)} rows)" for k, v in sorted(by.items()))
        raise DataError(
            f"{_where(rare)}: label {rare['label']!r} makes a third class; labels must be binary "
            f"(seen: {seen}); fix that row's label (a typo?) or drop the row"
        )
    if len(by) < 2:
        only = next(iter(by.values()))[0]
        raise DataError(
            f"{only['csv']}: the train manifest has only label {only['label']!r}; a binary "
            "classifier needs both classes in train; add rows of the other class"
        )
    return by


def resolve_labels(rows: list[dict], positive: str | None = None) -> dict[str, str]:
    """Map raw labels to ids in place (``r['label_id']``); returns classes {"0": negative, "1": positive}.

    Labels are binary: integers 0/1 (1 = positive), or two class names matched case-insensitively,
    where ``positive`` names the class that becomes 1. Without it only 'real'/'fake' are mapped
    ('fake' = 1); any other names are an error listing them. Val/test labels must occur in train.
    """
    is_int = [bool(_INT.match(r["label"])) for r in rows]
    if any(is_int) and not all(is_int):
        bad = rows[is_int.index(False)] if is_int[0] else rows[is_int.index(True)]
        raise DataError(
            f"{_where(bad)}: label {bad['label']!r} mixes integer labels and class names; "
            "use only integers 0/1 or only class names in every manifest"
        )
    train = [r for r in rows if r["split"] == "train"]
    if all(is_int):
        for r in rows:  # normalise '01' and friends
            r["label"] = str(int(r["label"]))
        by = _binary_check(train, lambda r: r["label"])
        if set(by) != {"0", "1"}:
            bad = next(r for r in train if r["label"] not in ("0", "1"))
            raise DataError(
                f"{_where(bad)}: unknown label {bad['label']}; integer labels must be 0 (negative) "
                f"and 1 (positive) (train has {sorted(by)}); renumber the labels"
            )
        if positive is not None and positive.strip() != "1":
            raise DataError(
                f"--positive {positive!r}: the manifests use integer labels, where 1 is always the "
                "positive class; drop --positive or write class names in the label column"
            )
        # neutral names: 0/1 say nothing about the task (pits, shirts, fakes); --names or data.classes name them
        ids, names = {"0": 0, "1": 1}, {0: "negative", 1: "positive"}
    else:
        by = _binary_check(train, lambda r: r["label"].casefold())
        display = {k: v[0]["label"] for k, v in by.items()}
        seen = sorted(display.values())
        if positive is not None:
            pos = positive.strip().casefold()
            if pos not in by:
                raise DataError(
                    f"--positive {positive!r} is not a label of the train manifest (labels seen: "
                    f"{seen}); pass one of them, matched case-insensitively"
                )
        elif set(by) == set(BINARY_NAMES):
            pos = "fake"
        else:
            raise DataError(
                f"{train[0]['csv']}: labels {seen} do not say which class is positive (label 1); "
                f"pass --positive NAME to 'distrib shard', NAME being the class to detect (--positive "
                f"{' or --positive '.join(shlex.quote(n) for n in seen)}). Only "
                "real/fake (fake = 1) and integer 0/1 labels are mapped without it"
            )
        ids = {k: int(k == pos) for k in by}
        names = {i: display[k] for k, i in ids.items()}
    for r in rows:
        k = r["label"] if all(is_int) else r["label"].casefold()
        if k not in ids:
            raise DataError(
                f"{_where(r)}: unknown label {r['label']!r}; the train manifest only has "
                f"{sorted(names.values()) if not all(is_int) else sorted(ids)}; fix the label "
                "or add that class to the train manifest"
            )
        r["label_id"] = ids[k]
    return {str(i): n for i, n in sorted(names.items())}


def parse_names(text: str | dict | None) -> dict[str, str] | None:
    """``negative=clean,positive=pit`` (or that dict) -> {"negative": "clean", "positive": "pit"}."""
    if not text:
        return None
    if isinstance(text, str):
        pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise DataError(f"--names {text!r}: write negative=NAME,positive=NAME (e.g. negative=clean,positive=pit)")
        text = {k.strip(): v.strip() for k, v in pairs}
    if set(text) != {"negative", "positive"} or not all(text.values()) or text["negative"] == text["positive"]:
        raise DataError(
            f"class names {text!r}: give two different names as negative=NAME,positive=NAME "
            "(e.g. negative=clean,positive=pit)"
        )
    return {"negative": str(text["negative"]), "positive": str(text["positive"])}


def name_classes(classes: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    """The user's ``names`` (from parse_names) for the ``classes`` resolve_labels found. Integer labels take any
    names; class-name labels already name themselves, so other names would silently relabel every report."""
    named = {"0": names["negative"], "1": names["positive"]}
    if classes != {"0": "negative", "1": "positive"} and {k: v.casefold() for k, v in classes.items()} != {
        k: v.casefold() for k, v in named.items()
    }:
        raise DataError(
            f"the manifests' labels are {classes['0']!r} (0) and {classes['1']!r} (1), but the class names given "
            f"(--names or a recipe's data.classes) are {named['0']!r} and {named['1']!r}; drop the names "
            f"(data.classes={{}}) or make them agree"
        )
    return named


def assign_keys_and_check(rows: list[dict]) -> None:
    """Give every row its key; duplicate keys and groups spanning splits are errors."""
    seen: dict[str, dict] = {}
    for r in rows:
        r["key"] = make_key(r["source_path"])
        if r["key"] in seen:
            first = seen[r["key"]]
            raise DataError(
                f"duplicate key {r['key']!r}: {_where(first)} ({first['source_path']}) and "
                f"{_where(r)} ({r['source_path']}); every image must appear once across all "
                "manifests and paths must differ in more than dots/punctuation; remove or rename one"
            )
        seen[r["key"]] = r
    split_of: dict[str, dict] = {}
    for r in rows:
        first = split_of.setdefault(r["group"], r)
        if first["split"] != r["split"]:
            raise DataError(
                f"group {r['group']!r} appears in {first['split']} ({_where(first)}) and "
                f"{r['split']} ({_where(r)}); a source must stay in one split, or the "
                "held-out metrics leak; move all its rows to one manifest"
            )


def check_copies(rows: list[dict]) -> int:
    """The same image under two names is one image: a test row that is a byte-identical copy of a train
    row (another path, a ``..`` spelling, a symlink) leaks. Paths are compared after realpath and
    contents by sha256. Across splits: an error naming both rows; within one split: a warning with
    the count, which is returned."""
    import hashlib
    import logging
    import os

    first: dict[str, dict] = {}
    within = 0
    for r in rows:
        real = os.path.realpath(r["path"])
        try:
            with open(real, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            continue  # a missing/unreadable file is reported by the image check, with its row
        seen = first.setdefault(digest, r)
        if seen is r:
            continue
        if seen["split"] != r["split"]:
            same = "the same file" if os.path.realpath(seen["path"]) == real else "byte-identical copies"
            raise DataError(
                f"{_where(seen)} ({seen['source_path']}, {seen['split']}) and {_where(r)} ({r['source_path']}, "
                f"{r['split']}) are {same}: an image in two splits leaks into the held-out metrics; "
                "remove one of the rows"
            )
        within += 1
    if within:
        logging.getLogger("distrib").warning(
            "shard: %d row(s) repeat the bytes of another row of the same split (duplicates weigh twice)", within
        )
    return within


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
    raise DataError(
        f"{len(bad)} image(s) cannot be read:\n"
        + "\n".join(lines)
        + more
        + "\nfix the paths (relative paths are relative to the manifest's folder) or drop those rows"
    )


def assign_folds(train: list[dict], folds: int, seed: int) -> None:
    """StratifiedGroupKFold fold per train row (``r['fold']``); no group lands in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [r["group"] for r in train]
    n_groups = len(set(groups))
    if n_groups < folds:
        raise DataError(
            f"{train[0]['csv']}: {n_groups} group(s) but folds={folds}; every fold needs "
            f"whole groups, so use --folds {max(2, n_groups)} or fewer, or add groups"
        )
    y = np.array([r["label_id"] for r in train])
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, idx) in enumerate(cv.split(np.zeros(len(train)), y, groups)):
        for i in idx:
            train[i]["fold"] = k
    sizes = np.bincount([r["fold"] for r in train], minlength=folds)
    if (sizes == 0).any():
        raise DataError(
            f"{train[0]['csv']}: fold {int(np.argmin(sizes))} got no rows (groups are too "
            f"uneven for {folds} folds); use fewer folds or split the largest groups"
        )
