"""Group-aware K-fold WebDataset shard writer and inspector (layout and index.json: docs/DESIGN.md).

    distrib shard --train train_manifest.csv --val val_manifest.csv --test test_manifest.csv --out shards/ --folds 5
    distrib shard inspect shards/

All validation happens before anything is written; each shard is written under a temp name and
renamed, one shard per worker task, streaming one image at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg

from distrib.atomic import writable_dir, write_json
from distrib.data import manifest as mf
from distrib.errors import DataError

INDEX = "index.json"
_TAR_OVERHEAD = 3 * 1024 + 512  # three member headers + padding per sample, for the byte budget
_MEMBER_EXTS = ("jpg", "cls", "json")


def _fingerprint(
    paths: dict,
    folds: int,
    seed: int,
    shard_size: int,
    shard_bytes: int,
    positive: str | None = None,
    names: dict | None = None,
) -> str:
    settings = [folds, seed, shard_size, shard_bytes] + ([positive.strip().casefold()] if positive else [])
    settings += [names] if names else []
    h = hashlib.sha256(json.dumps(settings).encode())
    for split in ("train", "val", "test"):
        if paths.get(split):
            h.update(split.encode() + str(Path(paths[split]).resolve()).encode())
            h.update(Path(paths[split]).read_bytes())
    return h.hexdigest()


def _check_args(folds: int, shard_size: int, shard_bytes: int, workers: int) -> None:
    for name, value, lo in (
        ("folds", folds, 2),
        ("shard_size", shard_size, 1),
        ("shard_bytes", shard_bytes, 1024),
        ("workers", workers, 1),
    ):
        if not isinstance(value, int) or value < lo:
            raise DataError(f"{name}={value!r} is invalid; use an integer >= {lo}")


def _existing(out: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """The existing index when ``out`` is complete and from the same inputs (no-op); else None."""
    index_path = out / INDEX
    if overwrite or not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            raise ValueError(f"a JSON {type(index).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(
            f"{index_path} is corrupt ({type(e).__name__}: {e}), so the shards in {out} cannot be "
            "trusted; pass --overwrite to rewrite them, or choose another --out"
        ) from None
    complete = all((out / s["path"]).is_file() for s in index.get("shards", []))
    if index.get("fingerprint") == fingerprint and complete:
        return index
    why = "from different manifests or settings" if complete else "with missing shards"
    raise DataError(
        f"{out} already holds shards {why}; pass overwrite=True (--overwrite) to replace them or choose another --out"
    )


def _plan(rows: list[dict], split: str, fold: int, shard_size: int, shard_bytes: int, rng) -> list[dict]:
    """Chunk one split/fold (shuffled, so each shard mixes groups and labels) into shard tasks."""
    rows = [rows[i] for i in rng.permutation(len(rows))]
    prefix = f"train-f{fold}" if split == "train" else split
    tasks, cur, cur_bytes = [], [], 0
    for r in rows:
        size = os.path.getsize(r["path"]) + _TAR_OVERHEAD
        if cur and (len(cur) >= shard_size or cur_bytes + size > shard_bytes):
            tasks.append(cur)
            cur, cur_bytes = [], 0
        cur.append(r)
        cur_bytes += size
    if cur:
        tasks.append(cur)
    return [{"path": f"{prefix}-{n:05d}.tar", "split": split, "fold": fold, "rows": t} for n, t in enumerate(tasks)]


def _jpeg_bytes(path: str) -> bytes:
    """The file's own bytes when it already is an RGB or grey JPEG (no generation loss), else a
    quality-95 JPEG of its 8-bit RGB conversion (16-bit, float, CMYK, palette, alpha: data.images)."""
    import simplejpeg
    from PIL import Image

    from distrib.data.images import to_rgb8

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        if data[:3] == b"\xff\xd8\xff" and im.mode in ("RGB", "L"):
            return data
        rgb = to_rgb8(im)
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=95, colorspace="RGB")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the byte offset of its data in the tar file."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same inputs, same sha256
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # the data ends padded at tar.offset


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_one_shard(out: str, task: dict) -> dict:
    """Write one shard (temp name + rename); returns its index entry. Runs in a worker process."""
    final = Path(out) / task["path"]
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    offsets = []  # per sample: [jpg data offset, jpg length, json data offset, json length] (one pread reads all)
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for r in task["rows"]:
                jpg = _jpeg_bytes(r["path"])
                height, width = simplejpeg.decode_jpeg_header(jpg)[:2]  # lets the ring loader skip the header parse
                meta = {
                    "key": r["key"],
                    "label": r["label_id"],
                    "group": r["group"],
                    "fold": task["fold"],
                    "split": task["split"],
                    "source_path": r["source_path"],
                    "height": height,
                    "width": width,
                }
                js = json.dumps(meta).encode()
                jpg_off = _add(tar, f"{r['key']}.jpg", jpg)
                _add(tar, f"{r['key']}.cls", str(r["label_id"]).encode())
                offsets.append([jpg_off, len(jpg), _add(tar, f"{r['key']}.json", js), len(js)])
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "path": task["path"],
        "split": task["split"],
        "fold": task["fold"],
        "count": len(task["rows"]),
        "bytes": final.stat().st_size,
        "sha256": _sha256(final),
        "offsets": offsets,
    }


def _pool(workers: int):
    # spawn: callers (tests, trainers) may hold torch/OpenMP threads that fork would copy mid-state.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _validate_images(rows: list[dict], workers: int) -> None:
    paths = [r["path"] for r in rows]
    if workers == 1 or len(paths) < 256:
        mf.raise_bad_images(rows, mf.check_images(paths))
        return
    step = -(-len(paths) // (workers * 4))
    chunks = [(s, paths[s : s + step]) for s in range(0, len(paths), step)]
    with _pool(workers) as ex:
        results = ex.map(mf.check_images, [c for _, c in chunks])
        bad = [(s + i, why) for (s, _), res in zip(chunks, results) for i, why in res]
    mf.raise_bad_images(rows, bad)


def _clean(out: Path, overwrite: bool) -> None:
    """Remove leftovers of interrupted runs, and with ``overwrite`` the shards of an incomplete set (no
    index: nothing usable to keep)."""
    for p in out.glob(".*.tar.tmp-*"):
        p.unlink()
    if overwrite:
        for pattern in ("train-f*-*.tar", "val-*.tar", "test-*.tar", INDEX):
            for p in out.glob(pattern):
                p.unlink()


def write_shards(
    train_csv,
    out,
    val=None,
    test=None,
    folds: int = 5,
    seed: int = 0,
    shard_size: int = 1000,
    shard_bytes: int = 256 * 1024 * 1024,
    workers: int = 2,
    overwrite: bool = False,
    positive: str | None = None,
    names: str | dict | None = None,
) -> dict:
    """Shard train (StratifiedGroupKFold folds) and val/test (fold -1) manifests into ``out``.

    Returns the index dict (also written to ``out/index.json``) plus ``"written"``: False when the
    output was already complete for the same inputs and nothing was done. ``positive`` names the class
    label that becomes 1 (manifest.resolve_labels); the mapping is recorded as ``classes``/``positive``.
    """
    _check_args(folds, shard_size, shard_bytes, workers)
    out = Path(out)
    paths = {"train": train_csv, "val": val, "test": test}
    rows = [r for split, p in paths.items() if p for r in mf.read_manifest(p, split)]
    names = mf.parse_names(names)
    fingerprint = _fingerprint(paths, folds, seed, shard_size, shard_bytes, positive, names)
    done = _existing(out, fingerprint, overwrite)
    if done is not None:
        return {**done, "written": False}

    classes = mf.resolve_labels(rows, positive)
    if names:  # the user's names for label 0 / label 1, in every index and report from here on
        classes = mf.name_classes(classes, names)
    mf.assign_keys_and_check(rows)
    for split in ("val", "test"):  # an AUC on one class is undefined: every later step would report NaN
        labels = {r["label_id"] for r in rows if r["split"] == split}
        if len(labels) == 1:
            raise DataError(
                f"{paths[split]}: the {split} split has only class {classes[str(labels.pop())]!r}; its AUC, "
                f"thresholds and reports would be undefined. Add rows of the other class to the {split} manifest"
            )
    mf.check_copies(rows)
    train = [r for r in rows if r["split"] == "train"]
    mf.assign_folds(train, folds, seed)
    for r in rows:
        r.setdefault("fold", -1)
    _validate_images(rows, workers)

    rng = np.random.default_rng(seed)
    tasks = []
    for k in range(folds):
        tasks += _plan([r for r in train if r["fold"] == k], "train", k, shard_size, shard_bytes, rng)
    for split in ("val", "test"):
        sub = [r for r in rows if r["split"] == split]
        if sub:
            tasks += _plan(sub, split, -1, shard_size, shard_bytes, rng)

    writable_dir(out, "--out")
    # --overwrite of a complete set: write the new set beside the old one and swap, so a failure (a full
    # disk, Ctrl-C) leaves the old set whole and usable. Otherwise write in place.
    swap = overwrite and (out / INDEX).exists()
    target = out.parent / f".{out.name}.new-{os.getpid()}" if swap else out
    _clean(out, not (out / INDEX).exists())
    try:
        writable_dir(target, "--out")
        if workers == 1 or len(tasks) == 1:
            entries = [write_one_shard(str(target), t) for t in tasks]
        else:
            with _pool(min(workers, len(tasks))) as ex:
                entries = list(ex.map(write_one_shard, [str(target)] * len(tasks), tasks))
        index = _build_index(rows, entries, classes, folds, seed, fingerprint)
        write_json(target / INDEX, index, indent=1)  # the index appears last: its presence means complete
    except BaseException:
        if swap:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if swap:
        _swap_in(target, out)
    return {**index, "written": True}


def _swap_in(new: Path, out: Path) -> None:
    """Replace ``out`` by the complete set in ``new``: files that are not shards (the writer's lock, the
    user's notes) move across first, then two renames; the old set is deleted only after."""
    shard_patterns = ("train-f*-*.tar", "val-*.tar", "test-*.tar", INDEX)
    old_shards = {p for pattern in shard_patterns for p in out.glob(pattern)}
    for p in out.iterdir():
        if p not in old_shards and not (new / p.name).exists():
            os.rename(p, new / p.name)  # a rename keeps the inode, so a held flock stays held
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _build_index(rows, entries, classes, folds, seed, fingerprint) -> dict:
    fold_counts: dict[str, dict[str, int]] = {str(k): {c: 0 for c in classes} for k in range(folds)}
    split_counts: dict[str, int] = {}
    label_counts: dict[str, dict[str, int]] = {}
    groups: dict[str, int] = {}
    heldout: dict[str, set] = {}
    for r in rows:
        split_counts[r["split"]] = split_counts.get(r["split"], 0) + 1
        lc = label_counts.setdefault(r["split"], {c: 0 for c in classes})
        lc[str(r["label_id"])] += 1
        if r["split"] == "train":
            fold_counts[str(r["fold"])][str(r["label_id"])] += 1
            groups[r["group"]] = r["fold"]
        else:
            heldout.setdefault(r["split"], set()).add(r["group"])
    return {
        "version": 1,
        "folds": folds,
        "seed": seed,
        "classes": classes,
        "positive": classes["1"],
        "shards": entries,
        "groups": groups,
        "heldout_groups": {s: sorted(g) for s, g in heldout.items()},
        "fold_label_counts": fold_counts,
        "split_counts": split_counts,
        "split_label_counts": label_counts,
        "fingerprint": fingerprint,
    }


class _HashingReader(io.RawIOBase):
    """Hashes a stream while tarfile reads it, so each shard is read only once."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        self.n += len(data)
        b[: len(data)] = data
        return len(data)

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.h.hexdigest()


def _inspect_one(base: str, entry: dict) -> dict:
    """Checksum, sample count and member sanity of one shard."""
    res = {
        "path": entry["path"],
        "split": entry["split"],
        "fold": entry["fold"],
        "count": entry["count"],
        "found": 0,
        "sha256_ok": False,
        "problems": [],
        "groups": set(),
    }
    from distrib.data.index import open_url  # lazy: webdataset imports torch, which writers never need

    try:
        with open_url(base.replace("{}", entry["path"])) as raw:
            reader = _HashingReader(raw)
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    data = tar.extractfile(m).read() if ext in ("cls", "json") else b""
                    members.setdefault(key, {})[ext] = data
            res["sha256_ok"] = reader.drain() == entry["sha256"]
    except (OSError, tarfile.TarError, EOFError) as e:
        res["problems"].append(f"{entry['path']}: unreadable ({type(e).__name__}: {e})")
        return res
    res["found"] = len(members)
    if not res["sha256_ok"]:
        res["problems"].append(f"{entry['path']}: sha256 differs from index.json (corrupted or replaced)")
    if res["found"] != entry["count"]:
        res["problems"].append(f"{entry['path']}: {res['found']} samples, index.json says {entry['count']}")
    if "offsets" in entry and len(entry["offsets"]) != entry["count"]:
        res["problems"].append(
            f"{entry['path']}: index.json has {len(entry['offsets'])} sample offsets for {entry['count']} samples"
        )
    for key, exts in members.items():
        missing = [e for e in _MEMBER_EXTS if e not in exts]
        if missing:
            res["problems"].append(f"{entry['path']}: sample {key!r} lacks {missing}")
            continue
        meta = json.loads(exts["json"])
        if meta.get("fold") != entry["fold"] or str(meta.get("label")) != exts["cls"].decode():
            res["problems"].append(f"{entry['path']}: sample {key!r} metadata disagrees with its shard/label")
        res["groups"].add(meta.get("group"))
    return res


def inspect_shards(dir_or_url, strict: bool = True) -> dict:
    """Verify every shard's sha256, sample count and members, and that no group spans two folds.

    With ``strict`` any problem raises DataError; ``format_inspection`` renders the result as a table.
    """
    from distrib.data.index import read_index

    index = read_index(dir_or_url)  # the loader's reader: same locations (path, URL, pipe:) everywhere
    base = index["_base"]
    results = [_inspect_one(base, e) for e in index["shards"]]
    problems = [p for r in results for p in r["problems"]]
    fold_of: dict[str, object] = {}
    for r in results:
        tag = r["fold"] if r["split"] == "train" else r["split"]
        for g in r.pop("groups"):
            if fold_of.setdefault(g, tag) != tag:
                problems.append(f"group {g!r} appears in both {fold_of[g]} and {tag}: folds/splits leak")
    summary = {
        "ok": not problems,
        "location": index["_url"],
        "shards": results,
        "problems": problems,
        "folds": index["folds"],
        "split_counts": index.get("split_counts"),
        "fold_label_counts": index.get("fold_label_counts"),
        "classes": index.get("classes"),
    }
    if strict and problems:
        raise DataError(
            f"{index['_url']}: {len(problems)} shard problem(s), first: {problems[0]}; "
            "re-run 'distrib shard ... --overwrite' to rewrite the shards"
        )
    return summary


def format_inspection(summary: dict) -> str:
    """The inspection as a table of shards, a count line and one line per problem."""
    lines = [f"{'shard':<24} {'split':<6} {'fold':>4} {'count':>6} {'found':>6}  sha256"]
    for r in summary["shards"]:
        lines.append(
            f"{r['path']:<24} {r['split']:<6} {r['fold']:>4} {r['count']:>6} {r['found']:>6}  "
            f"{'ok' if r['sha256_ok'] else 'BAD'}"
        )
    lines.append(
        f"{len(summary['shards'])} shards, {sum(r['found'] for r in summary['shards'])} samples, "
        f"{len(summary['problems'])} problem(s)"
    )
    return "\n".join(lines + ["  " + p for p in summary["problems"]])
