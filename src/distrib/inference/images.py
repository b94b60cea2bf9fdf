"""What ``distrib predict`` reads: a folder of images, a CSV with a ``path`` column, or a shard directory.

``open_images(spec)`` returns an ``ImageSource``; its ``batches(transform, batch_size, workers)``
yields ``{"image": uint8 rows, "path", "group", "label" (-1 = unknown), "split"}`` in a fixed order.
Files are decoded exactly as the shard loader decodes a sample (``decode_image`` DCT-downscaled toward
the transform's size, then its per-sample ``prepare``) by a torch ``DataLoader`` with workers. A file
that cannot be read or decoded, or a folder entry that is not an image, is added to ``skipped``
(path + reason) and the rest go on; shard samples the loader skips are counted the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from distrib.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class _Files:
    """Map-style dataset over file paths: (index, uint8 image or None, reason)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from distrib.data.transforms import decode_image

        try:
            data = Path(self.paths[i]).read_bytes()
            return i, self.transform.prepare(decode_image(data, self.transform.size)), ""
        except Exception as e:  # listed in <out>_skipped.csv; the run goes on
            return i, None, f"{type(e).__name__}: {e}"


def _collate(rows):
    import torch

    good = [r for r in rows if r[1] is not None]
    return {
        "index": [r[0] for r in good],
        "image": torch.stack([r[1] for r in good]) if good else None,
        "bad": [(r[0], r[2]) for r in rows if r[1] is None],
    }


@dataclass
class ImageSource:
    """The images to score: ``kind`` is 'files' or 'shards'; ``skipped`` grows while ``batches`` runs."""

    spec: str
    kind: str
    items: pd.DataFrame = field(default_factory=pd.DataFrame)  # files: path, group, label
    splits: list = field(default_factory=list)  # shards: the splits read, in order
    total: int = 0  # images that will be tried
    skipped: list = field(default_factory=list)  # [{"path", "reason"}]

    def batches(self, transform, batch_size: int, workers: int):
        yield from (self._file_batches if self.kind == "files" else self._shard_batches)(transform, batch_size, workers)

    def _file_batches(self, transform, batch_size: int, workers: int):
        from torch.utils.data import DataLoader

        paths = self.items["path"].tolist()
        dl = DataLoader(
            _Files(paths, transform), batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate
        )
        groups, labels = self.items["group"].tolist(), self.items["label"].to_numpy()
        for b in dl:
            self.skipped += [{"path": paths[i], "reason": why} for i, why in b["bad"]]
            if b["image"] is None:
                continue
            idx = b["index"]
            yield {
                "image": b["image"].flatten(1),
                "path": [paths[i] for i in idx],
                "group": [groups[i] for i in idx],
                "label": labels[idx],
                "split": [""] * len(idx),
            }

    def _shard_batches(self, transform, batch_size: int, workers: int):
        from distrib.data.index import plan_split
        from distrib.data.loader import build_loader

        for split in self.splits:
            w = min(workers, len(plan_split(self.spec, split, None).urls))  # eval reading needs a shard per worker
            loader = build_loader(
                self.spec,
                split,
                None,
                rank=0,
                world_size=1,
                num_workers=w,
                batch_size=batch_size,
                epoch=0,
                transform=transform,
                seed=0,
                mode="eval",
            )
            for b in loader:
                valid = b["valid"].bool()
                if not valid.any():
                    continue
                idx = valid.nonzero().flatten().tolist()
                yield {
                    "image": b["image"][valid].flatten(1),
                    "path": [b["key"][i] for i in idx],
                    "group": [b["group"][i] for i in idx],
                    "label": b["label"][valid].numpy(),
                    "split": [split] * len(idx),
                }
            rep = loader.report()
            self.skipped += [
                {"path": f"{split}:{e.split(': ', 1)[0]}", "reason": e.split(": ", 1)[-1]} for e in rep["errors"]
            ]
            unnamed = loader.skipped - len(rep["errors"])
            self.skipped += [{"path": f"{split}:(unnamed)", "reason": "skipped by the shard loader"}] * max(unnamed, 0)


def _folder(root: Path) -> ImageSource:
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if not images:
        seen = f"; it holds {len(others)} other file(s), e.g. {others[0].name}" if others else " (the folder is empty)"
        raise DataError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}{seen}; point --images at a "
            "folder of images, a CSV with a 'path' column, or a shard directory"
        )
    skipped = [
        {
            "path": str(p),
            "reason": f"not an image file (extension '{p.suffix or '(none)'}'; "
            f"predict reads {', '.join(IMAGE_EXTENSIONS)})",
        }
        for p in others
    ]
    items = pd.DataFrame({"path": [str(p) for p in images], "group": "", "label": -1})
    return ImageSource(str(root), "files", items=items, total=len(images), skipped=skipped)


def _labels(raw: pd.Series, path: Path) -> pd.Series:
    """Optional labels for metrics: 0/1, or the manifests' real/fake names (case-insensitive); empty = unknown (-1)."""
    from distrib.data.manifest import BINARY_NAMES

    text = raw.fillna("").astype(str).str.strip()
    numeric = pd.to_numeric(text.where(text != ""), errors="coerce")
    names = text[(text != "") & numeric.isna()].str.lower()
    unknown = sorted(set(names) - set(BINARY_NAMES))
    if unknown:
        raise DataError(
            f"{path}: label values {unknown[:5]} are neither 0/1 nor real/fake; predict maps only those "
            "(1 = positive); write 0/1 labels, or drop the label column to predict without metrics"
        )
    return numeric.fillna(names.map(BINARY_NAMES)).fillna(-1).astype(int)


def _csv(path: Path) -> ImageSource:
    try:
        df = pd.read_csv(path, dtype={"path": str, "group": str})
    except Exception as e:
        raise DataError(f"cannot read the image list {path}: {e}; it must be a CSV with a 'path' column") from e
    if "path" not in df.columns:
        raise DataError(f"{path} has no 'path' column (columns: {list(df.columns)}); add one (optional: group, label)")
    if df.empty:
        raise DataError(f"{path} lists no images; add rows with a 'path' column")
    paths = [p if Path(p).is_absolute() else str(path.parent / p) for p in df["path"].astype(str)]
    label = _labels(df["label"], path) if "label" in df.columns else -1
    items = pd.DataFrame(
        {"path": paths, "group": df["group"].fillna("").astype(str) if "group" in df.columns else "", "label": label}
    )
    return ImageSource(str(path), "files", items=items, total=len(items))


def _shards(spec: str, split: str | None) -> ImageSource:
    from distrib.data.index import read_index

    counts = read_index(spec).get("split_counts", {})
    present = [s for s in ("val", "test", "train") if counts.get(s)]
    splits = present if split in (None, "", "all") else [split]
    if not set(splits) <= set(present) or not splits:
        raise DataError(
            f"{spec} has no '{split}' samples (splits present: {present}); pass --split one of those or all"
        )
    return ImageSource(spec, "shards", splits=splits, total=int(sum(counts[s] for s in splits)))


def open_images(spec: str | Path, split: str | None = None) -> ImageSource:
    """A folder (recursive), a CSV with a ``path`` column (optional ``group``, ``label``), or a shard dir/URL."""
    spec = str(spec)
    p = Path(spec)
    if "://" in spec or (p.is_dir() and (p / "index.json").is_file()) or p.name == "index.json":
        return _shards(str(p.parent) if p.name == "index.json" else spec, split)
    if p.is_dir():
        return _folder(p)
    if p.is_file() and p.suffix.lower() == ".csv":
        return _csv(p)
    raise DataError(
        f"--images {spec}: not a folder, a .csv image list or a shard directory (with index.json)"
        + ("" if p.exists() else "; the path does not exist")
    )


def skipped_frame(source: ImageSource) -> pd.DataFrame:
    return pd.DataFrame(source.skipped, columns=["path", "reason"])


__all__ = ["open_images", "ImageSource", "IMAGE_EXTENSIONS", "skipped_frame"]
