"""Offline demo dataset: real vs manipulated 64 px JPEG tiles cut from photographs shipped in wheels.

    distrib data demo --out data/demo [--size tiny|small|full] [--images MY_PHOTOS/]

Every tile position yields a real tile and a manipulated twin from the same pixels; both get the
same history (RGB conversion, one downscale, one final JPEG at quality 75-95), so only the
manipulation tells them apart. Groups are source photographs and never span two splits.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distrib.atomic import write_json
from distrib.demo.manipulations import KINDS, encode_jpeg, manipulate
from distrib.errors import DataError

MARGIN = 8  # context around each tile, needed by the shifted-grid double JPEG
SPLIT_FRACTIONS = (("test", 0.2), ("val", 0.15))  # of all tiles; the rest is train
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class SizePreset:
    """How densely photographs are tiled."""

    scales: tuple[float, ...]  # downscale factors applied to each photo (relative to a 512 px short side)
    stride: int  # tile stride in pixels; below the tile size tiles overlap
    max_per_photo: int  # cap on tile positions per photo and scale (0 = no cap)


SIZES = {
    "tiny": SizePreset(scales=(0.5,), stride=48, max_per_photo=12),
    "small": SizePreset(scales=(0.5,), stride=32, max_per_photo=60),
    "full": SizePreset(scales=(0.5, 0.75), stride=32, max_per_photo=0),
}
MIN_STD = 6.0  # tiles flatter than this (sky, moon background) hide every manipulation; skipped


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle(i: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return skimage.data.stereo_motorcycle()[i]

    return load


def _sklearn(i: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[i]

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


# (name, group, loader). Only non-downloading loaders; duplicates share a group (the stereo pair
# is one scene; skimage's cat() is chelsea() and is left out). Synthetic images are excluded.
BUNDLED = [
    ("astronaut", "astronaut", _skimage("astronaut")),
    ("camera", "camera", _skimage("camera")),
    ("chelsea", "chelsea", _skimage("chelsea")),
    ("coffee", "coffee", _skimage("coffee")),
    ("rocket", "rocket", _skimage("rocket")),
    ("coins", "coins", _skimage("coins")),
    ("clock", "clock", _skimage("clock")),
    ("brick", "brick", _skimage("brick")),
    ("grass", "grass", _skimage("grass")),
    ("gravel", "gravel", _skimage("gravel")),
    ("moon", "moon", _skimage("moon")),
    ("motorcycle_left", "motorcycle", _motorcycle(0)),
    ("motorcycle_right", "motorcycle", _motorcycle(1)),
    ("china", "china", _sklearn(0)),
    ("flower", "flower", _sklearn(1)),
    ("grace_hopper", "grace_hopper", _grace_hopper),
]


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    return arr


def _user_photos(images: Path) -> list[tuple[str, str, Callable[[], np.ndarray]]]:
    if not images.is_dir():
        raise DataError(f"--images {images}: not a directory; pass a folder of your own photos")
    from distrib.data.images import to_rgb8
    from distrib.data.manifest import check_image

    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in PHOTO_EXTS)
    bad = [f"{p} is {why}" for p in files if (why := check_image(str(p))) is not None]
    if bad:  # refused, not skipped: a photo silently missing from the dataset would change the splits
        raise DataError(
            f"--images {images}: {len(bad)} photo(s) cannot be read, first: {bad[0]}; remove or "
            "re-save them (nothing was written)"
        )
    photos = []
    for p in files:
        group = "_".join(p.relative_to(images).with_suffix("").parts)
        group = "".join(c if c.isalnum() or c in "-_" else "_" for c in group)
        photos.append((group, group, lambda p=p: to_rgb8(Image.open(p))))
    if len(photos) < 6:
        raise DataError(
            f"--images {images}: found {len(photos)} photos ({', '.join(PHOTO_EXTS)}); "
            "need at least 6 so train/val/test each get whole photos; add more photos"
        )
    return photos


def _scaled_versions(photo: np.ndarray, preset: SizePreset) -> list[np.ndarray]:
    """The photo at each preset scale; the shared downscale also blurs away any earlier JPEG grid."""
    base = min(1.0, 512.0 / min(photo.shape[:2]))
    out = []
    for s in preset.scales:
        h, w = (max(1, round(d * base * s)) for d in photo.shape[:2])
        out.append(np.asarray(Image.fromarray(photo).resize((w, h), Image.LANCZOS)).astype(np.float32))
    return out


def _positions(img: np.ndarray, tile: int, preset: SizePreset, rng: np.random.Generator) -> tuple[list, int]:
    """Tile positions (y, x) with a full margin around them, minus flat tiles; returns (kept, n_flat)."""
    h, w = img.shape[:2]
    ys = range(MARGIN, h - tile - MARGIN + 1, preset.stride)
    xs = range(MARGIN, w - tile - MARGIN + 1, preset.stride)
    kept, flat = [], 0
    for y in ys:
        for x in xs:
            if img[y : y + tile, x : x + tile].mean(axis=2).std() < MIN_STD:
                flat += 1
            else:
                kept.append((y, x))
    if preset.max_per_photo and len(kept) > preset.max_per_photo:
        idx = rng.choice(len(kept), preset.max_per_photo, replace=False)
        kept = [kept[i] for i in sorted(idx)]
    return kept, flat


def _assign_splits(group_sizes: dict[str, int], rng: np.random.Generator) -> dict[str, str]:
    """Whole groups to test/val until each holds its share of tiles (at least one group); rest train."""
    order = [g for g in sorted(group_sizes)]
    rng.shuffle(order)
    total = sum(group_sizes.values())
    split_of: dict[str, str] = {}
    for split, frac in SPLIT_FRACTIONS:
        taken = 0
        for g in order:
            if g in split_of:
                continue
            if taken >= frac * total:
                break
            split_of[g] = split
            taken += group_sizes[g]
    for g in order:
        split_of.setdefault(g, "train")
    return split_of


def _check_out(out: Path, params: dict, overwrite: bool) -> dict | None:
    """Existing complete output with the same parameters -> its summary (no-op); else prepare ``out``."""
    summary_path = out / "summary.json"
    if summary_path.exists() and not overwrite:
        summary = json.loads(summary_path.read_text())
        if summary.get("params") == params:
            return summary
        raise DataError(
            f"{out} already holds a demo dataset built with {summary.get('params')}; "
            "pass overwrite=True (--overwrite) to rebuild it or choose another --out"
        )
    if overwrite:
        for name in (
            "images",
            "summary.json",
            "manipulations.csv",
            "train_manifest.csv",
            "val_manifest.csv",
            "test_manifest.csv",
        ):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def build_demo_dataset(
    out, images=None, size: str = "full", tile: int = 64, seed: int = 0, overwrite: bool = False
) -> dict:
    """Build the real-vs-manipulated tile dataset under ``out``; returns a summary dict.

    Writes ``out/images/<group>/<n>.jpg``, ``out/{train,val,test}_manifest.csv`` (path,label,group;
    label 1 = manipulated), ``out/manipulations.csv`` (which manipulation each tile got) and
    ``out/summary.json``. Re-running with the same parameters is a no-op unless ``overwrite``.
    """
    if size not in SIZES:
        raise DataError(f"size={size!r} is not a preset; use one of {', '.join(SIZES)}")
    if not 16 <= tile <= 512:
        raise DataError(f"tile={tile} is out of range; use 16..512 pixels (64 is the default)")
    out = Path(out)
    sources = _user_photos(Path(images)) if images else BUNDLED
    params = {"size": size, "tile": tile, "seed": seed, "images": str(images) if images else None}
    done = _check_out(out, params, overwrite)
    if done is not None:
        return done
    preset, rng = SIZES[size], np.random.default_rng(seed)

    # Pass 1: photos and tile positions (cheap), so splits can be fixed before any manipulation.
    photos, n_flat, skipped_small = [], 0, []
    for name, group, load in sources:
        for scale_idx, img in enumerate(_scaled_versions(_to_rgb(load()), preset)):
            pos, flat = _positions(img, tile, preset, rng)
            n_flat += flat
            if pos:
                photos.append({"name": f"{name}_s{scale_idx}", "group": group, "img": img, "pos": pos})
            else:
                skipped_small.append(f"{name}_s{scale_idx}")
    sizes: dict[str, int] = {}
    for p in photos:
        sizes[p["group"]] = sizes.get(p["group"], 0) + len(p["pos"])
    if len(sizes) < 3:
        raise DataError(
            f"only {len(sizes)} photos gave usable {tile} px tiles; need at least 3 "
            "(train/val/test); use larger photos or a smaller --tile"
        )
    split_of = _assign_splits(sizes, rng)

    rows = _write_tiles(out, photos, split_of, tile, rng)
    _write_manifests(out, rows)
    summary = _summarise(rows, split_of, params)
    summary.update({"out": str(out), "skipped_flat_tiles": n_flat, "skipped_small_photos": skipped_small})
    write_json(out / "summary.json", summary)
    return summary


def _write_tiles(out: Path, photos: list[dict], split_of: dict, tile: int, rng) -> list[dict]:
    """Real tile + manipulated twin per position; splice donors come from the same split only."""
    by_split: dict[str, list[dict]] = {}
    for p in photos:
        by_split.setdefault(split_of[p["group"]], []).append(p)
    rows = []
    for p in photos:
        donors = [d for d in by_split[split_of[p["group"]]] if d["group"] != p["group"]]
        gdir = out / "images" / p["group"]
        gdir.mkdir(parents=True, exist_ok=True)
        for y, x in p["pos"]:
            ctx = p["img"][y - MARGIN : y + tile + MARGIN, x - MARGIN : x + tile + MARGIN]
            kinds = [k for k in KINDS if k != "splice" or donors]
            kind = kinds[int(rng.integers(len(kinds)))]
            donor = donors[int(rng.integers(len(donors)))]["img"] if kind == "splice" else None
            fake, params = manipulate(kind, ctx, MARGIN, rng, donor=donor)
            real = ctx[MARGIN : MARGIN + tile, MARGIN : MARGIN + tile]
            for label, arr, k in ((0, real, "none"), (1, fake, kind)):
                q = int(rng.integers(75, 96))  # final JPEG, drawn the same way for both classes
                rows.append(
                    {
                        "group": p["group"],
                        "label": label,
                        "kind": k,
                        "quality": q,
                        "source": p["name"],
                        "yx": [y, x],
                        "params": params if label else {},
                        "bytes": encode_jpeg(arr, q),
                    }
                )
    # File names are shuffled within a group so neither name nor order reveals the label.
    order = rng.permutation(len(rows))
    counters: dict[str, int] = {}
    for i in order:
        r = rows[i]
        n = counters[r["group"]] = counters.get(r["group"], -1) + 1
        r["path"] = f"images/{r['group']}/{n:05d}.jpg"
        (out / r["path"]).write_bytes(r.pop("bytes"))
        r["split"] = split_of[r["group"]]
    return [rows[i] for i in order]


def _write_manifests(out: Path, rows: list[dict]) -> None:
    for split in ("train", "val", "test"):
        with open(out / f"{split}_manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "group"])
            for r in rows:
                if r["split"] == split:
                    w.writerow([r["path"], r["label"], r["group"]])
    with open(out / "manipulations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label", "kind", "quality", "source", "y", "x", "params"])
        for r in rows:
            w.writerow(
                [
                    r["path"],
                    r["split"],
                    r["label"],
                    r["kind"],
                    r["quality"],
                    r["source"],
                    r["yx"][0],
                    r["yx"][1],
                    json.dumps(r["params"]),
                ]
            )


def _summarise(rows: list[dict], split_of: dict, params: dict) -> dict:
    splits = {}
    for split in ("train", "val", "test"):
        sub = [r for r in rows if r["split"] == split]
        splits[split] = {
            "n": len(sub),
            "real": sum(r["label"] == 0 for r in sub),
            "manipulated": sum(r["label"] == 1 for r in sub),
            "groups": sorted({g for g, s in split_of.items() if s == split}),
        }
    kinds: dict[str, int] = {}
    for r in rows:
        if r["label"] == 1:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"params": params, "n": len(rows), "groups": len(split_of), "splits": splits, "manipulations": kinds}
