"""Checks a shard index before training trusts it: every shard exists, then sha256 or size + tar header.

``data.verify``: ``full`` hashes every shard against index.json's sha256; ``size`` compares each
file's size with the index and parses its first tar header (catches truncation, replacement and
non-tar files without reading the data); ``auto`` is ``full`` when the shards total at most
``AUTO_FULL_BYTES`` (1 GiB, a few seconds of hashing on each rank) and ``size`` above. Shards behind a URL or
``pipe:`` cannot be stat'ed: they are checked by the loader while reading, and the run's
``train.max_skipped_fraction`` bounds what it may lose.
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

from distrib.errors import DataError

AUTO_FULL_BYTES = 1024**3
log = logging.getLogger(__name__)


def class_mapping(index: dict) -> dict:
    """The index's label mapping, {'classes': {'0': neg, '1': pos}, 'positive': pos} (older indexes: from classes)."""
    classes = {str(k): v for k, v in (index.get("classes") or {}).items()}
    return {"classes": classes, "positive": index.get("positive", classes.get("1"))}


def check_classes(index: dict, wanted: dict) -> None:
    """``data.classes`` ({negative, positive}; {} = no check) must be the index's mapping, case-insensitively."""
    if not wanted:
        return
    have = class_mapping(index)["classes"]
    want = {"0": wanted["negative"], "1": wanted["positive"]}
    if {k: str(v).strip().casefold() for k, v in have.items()} != {k: v.strip().casefold() for k, v in want.items()}:
        raise DataError(
            f"{index['_url']} maps labels as {have} (1 = positive), but data.classes says negative="
            f"{wanted['negative']!r}, positive={wanted['positive']!r}; re-shard with "
            f"'distrib shard ... --positive {wanted['positive']} --overwrite' or fix data.classes"
        )


def _local_path(index: dict, entry: dict) -> Path | None:
    base = index["_base"]
    if base.startswith("pipe:") or "://" in base:
        return None
    return Path(base.replace("{}", entry["path"]))


def _header_ok(path: Path) -> str | None:
    with open(path, "rb") as f:
        block = f.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return f"its first tar header is invalid ({e})"
    return None


def verify_shards(index: dict, mode: str = "auto") -> dict:
    """Raise DataError naming the first missing or damaged shard; returns {'mode', 'shards', 'bytes'}."""
    from distrib.data.shards import _sha256

    local = [(e, _local_path(index, e)) for e in index["shards"]]
    local = [(e, p) for e, p in local if p is not None]
    if not local:
        log.info("data.verify: %s is remote; shards are checked while they are read", index["_url"])
        return {"mode": "remote", "shards": 0, "bytes": 0}
    missing = [str(p) for _, p in local if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} shard(s) listed in {index['_url']} are missing, first: {missing[0]}; "
            "restore them or re-run 'distrib shard ... --overwrite'"
        )
    total = sum(p.stat().st_size for _, p in local)
    if mode == "auto":
        mode = "full" if total <= AUTO_FULL_BYTES else "size"
    for e, p in local:
        why = None
        if "bytes" in e and os.path.getsize(p) != int(e["bytes"]):
            why = f"is {os.path.getsize(p)} bytes, index.json says {e['bytes']}"
        elif mode == "full" and "sha256" in e and _sha256(p) != e["sha256"]:
            why = "has a sha256 that differs from index.json (corrupted or replaced)"
        elif mode == "size":
            why = _header_ok(p)
        if why:
            raise DataError(
                f"shard {p} {why} (data.verify={mode}); run 'distrib shard inspect "
                f"{index['_url']}' and re-shard with 'distrib shard ... --overwrite'"
            )
    return {"mode": mode, "shards": len(local), "bytes": total}
