"""Test helper: tiny WebDataset shards in the DESIGN.md layout with chosen (uneven/corrupt) shard sizes.

``distrib.data.shards.write_shards`` makes balanced shards from manifests; the loader tests need exact
layouts (one 3-sample shard next to a 40-sample one, a truncated tar, a garbage JPEG), so they write
the same format directly with webdataset's TarWriter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import simplejpeg
import webdataset as wds


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    return simplejpeg.encode_jpeg(img, quality=90)


def write_tiny_shards(
    out: Path,
    layout: list[tuple[str, int, int]],
    size: int = 32,
    seed: int = 0,
    bad_jpeg: set[str] = frozenset(),
    truncate: dict[str, int] | None = None,
) -> dict:
    """Write shards for ``layout`` = [(split, fold, count), ...] and index.json; returns the index.

    Keys are ``{split}{fold}_{shard}_{i}``; the group is ``g{shard}_{i // 4}``. ``bad_jpeg`` keys get
    garbage image bytes; ``truncate`` maps a shard file name to the byte length it is cut to (its
    index count stays the full count, as after a broken copy).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, n_per = [], {}
    for si, (split, fold, count) in enumerate(layout):
        n = n_per.get((split, fold), 0)
        n_per[(split, fold)] = n + 1
        name = f"train-f{fold}-{n:05d}.tar" if split == "train" else f"{split}-{n:05d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for i in range(count):
                tag = f"f{fold}" if split == "train" else split
                key = f"{tag}s{si}i{i}"
                label = int(rng.integers(0, 2))
                meta = {
                    "key": key,
                    "label": label,
                    "group": f"g{si}_{i // 4}",
                    "fold": fold if split == "train" else -1,
                    "source_path": f"img/{key}.jpg",
                }
                img = b"not a jpeg at all" if key in bad_jpeg else _jpeg(rng, size)
                w.write({"__key__": key, "jpg": img, "cls": str(label).encode(), "json": json.dumps(meta).encode()})
        if truncate and name in truncate:
            data = (out / name).read_bytes()
            (out / name).write_bytes(data[: truncate[name]])
        shards.append(
            {
                "path": name,
                "split": split,
                "fold": fold if split == "train" else -1,
                "count": count,
                "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
            }
        )
    folds = sorted({f for s, f, _ in layout if s == "train"})
    index = {"folds": len(folds), "seed": seed, "classes": {"0": "real", "1": "fake"}, "shards": shards}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index
