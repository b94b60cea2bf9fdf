"""Loader benchmark: this loader vs the JPEG decode limit vs torchvision ImageFolder, same images, same workers.

    distrib bench loader --shards shards/ --workers 2 --steps 20 [sizes=64,128,224] [device=cuda] [ring=false]

(a) ``build_loader`` with the training transform; (b) the decode limit: tight loops of JPEG decode +
resize + float conversion over the same bytes in as many processes as workers, at the same time; (c) torchvision ImageFolder +
PIL with the same augmentations (torchvision v2 per sample, kornia motion blur) over the same images
written as files. Each rate skips one warm-up batch. ``profile_us_per_image`` splits this loader's
per-image cost by stage (measured in-process), and the same loader without augmentation is timed too,
so a missed target says where the time goes (pipeline overhead vs augmentation).

Per image size (``sizes=``, default data.img_size), the augment.device=model split is measured too:
``cpu_side`` is the loader that only reads, decodes and resizes to uint8 (its ``ratio_to_decode_limit``
is the target figure); ``device_augment`` is the fused augmentation + normalization alone on ``device``
(cuda when available, else cpu); ``together`` is the loader feeding ``Loader.to_device`` on that device.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distrib.config import AugmentConfig, DataConfig, load_config
from distrib.data.index import plan_split, read_index, read_samples
from distrib.data.loader import PREFETCH, _Stats, build_loader
from distrib.data.transforms import build_transform, decode_image, resolve_mean_std
from distrib.errors import DistribError

ROUNDS = 3  # loader / decode-limit alternations per size for the cpu_side ratio (the median is reported)

# Without --config: the augmentation the experiments ask for (flips, rotation up to 180, affine, motion
# blur, ColorJitter) at the demo tiles' 64 px; dotted overrides (data.img_size=224 ...) still apply.
BENCH_DEFAULTS = [
    "augment.hflip=0.5",
    "augment.vflip=0.5",
    "augment.rotate=180",
    "augment.translate=0.1",
    "augment.scale_min=0.9",
    "augment.scale_max=1.1",
    "augment.motion_blur_p=0.5",
    "augment.color_jitter=[0.3,0.3,0.2,0.05]",
    "data.img_size=64",
    "data.batch_size=32",
    "data.shuffle_buffer=256",
]


def _timed(batches, steps: int, warmup: int = 1, cpu: dict | None = None) -> tuple[float, int]:
    """Images/s over ``steps`` batches after ``warmup`` batches (worker start-up excluded for every method).

    With ``cpu`` (a dict) also ``cpu["us_per_image"]``: CPU time of this process and its children (the
    DataLoader workers), all threads, per image over the same window; other tenants of the machine barely move it.
    """
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, t0, c0 = 0, time.perf_counter(), _tree_cpu_s()
    for b in itertools.islice(it, steps):
        n += len(b[1]) if isinstance(b, (list, tuple)) else len(b["key"])
    if cpu is not None:
        cpu["us_per_image"] = (_tree_cpu_s() - c0) * 1e6 / max(1, n)
    return n / (time.perf_counter() - t0), n


def _tree_cpu_s() -> float:
    """CPU seconds so far of this process and its live children, every thread (Linux /proc schedstat; else 0)."""
    me = os.getpid()
    pids = {me}
    try:
        for t in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{t}/children") as f:
                pids.update(int(c) for c in f.read().split())
    except OSError:
        return 0.0
    total = 0
    for pid in pids:
        try:
            for t in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError):  # a thread/process that just ended
            pass
    return total / 1e9


def _samples(shards: str, limit: int) -> list[dict]:
    plan = plan_split(shards, "train", None)
    out = []
    for s in read_samples(({"url": u} for u in plan.urls), plan.counts, _Stats(), plan.offsets):
        if s.get("jpg") is not None:
            out.append(s)
        if len(out) >= limit:
            break
    if not out:
        raise DistribError(f"no JPEG samples in the train shards of {shards}; run 'distrib shard' first")
    return out


def _decode_limit(samples: list[dict], size: int, n: int, cpu_us: bool = False):
    """Single-process JPEG decode + resize + float conversion rate (images/s); with ``cpu_us`` also its CPU us/image."""
    tf = build_transform(None, DataConfig(img_size=size, normalize="none"), train=False)
    blobs = [s["jpg"] for s in samples]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a DataLoader worker
    try:
        for b in blobs[:8]:
            tf.prepare(decode_image(b, size)).float()
        t0, c0 = time.perf_counter(), time.process_time()
        for b in itertools.islice(itertools.cycle(blobs), n):
            tf.prepare(decode_image(b, size)).float()
        rate = n / (time.perf_counter() - t0)
        return (rate, (time.process_time() - c0) * 1e6 / n) if cpu_us else rate
    finally:
        torch.set_num_threads(threads)


def _parallel_decode_limit(samples: list[dict], size: int, n: int, workers: int, cpu_us: bool = False):
    """The decode limit of ``workers`` processes decoding at the same time (sum of their rates); with
    ``cpu_us`` also their mean CPU us per image.

    Measured, not ``workers x`` one process: on a machine whose cores are shared (or fewer than the
    workers) the product would promise a rate no loader could reach.
    """
    if workers <= 1:
        return _decode_limit(samples, size, n, cpu_us)
    import multiprocessing

    blobs = [{"jpg": s["jpg"]} for s in samples]
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # forked like DataLoader workers
        res = pool.starmap(_decode_limit, [(blobs, size, n, True)] * workers)
    rate = sum(r[0] for r in res)
    return (rate, statistics.mean(r[1] for r in res)) if cpu_us else rate


def _imagefolder(
    samples: list[dict], root: Path, size: int, aug: AugmentConfig, mean_std, workers: int, batch: int, steps: int
) -> float:
    """torchvision ImageFolder + PIL with the same augmentations applied per sample."""
    import kornia.augmentation as K
    import torchvision.transforms.v2 as T
    from torchvision.datasets import ImageFolder

    for s in samples:
        label = int(s["cls"]) if s.get("cls") is not None else 0
        d = root / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{s['__key__'].replace('/', '_')}.jpg").write_bytes(s["jpg"])
    blur = K.RandomMotionBlur(aug.motion_blur_kernel, aug.motion_blur_angle, 0.0, p=aug.motion_blur_p)
    steps_tf = [
        T.PILToTensor(),
        T.RandomHorizontalFlip(aug.hflip),
        T.RandomVerticalFlip(aug.vflip),
        T.RandomAffine(aug.rotate, translate=(aug.translate, aug.translate), scale=(aug.scale_min, aug.scale_max)),
        T.ColorJitter(*aug.color_jitter),
        T.Resize(size, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
        T.Lambda(lambda x: blur(x[None])[0]),
    ]
    if mean_std is not None:
        steps_tf.append(T.Normalize(list(mean_std[0]), list(mean_std[1])))
    ds = ImageFolder(str(root), transform=T.Compose(steps_tf))
    dl = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    epochs = math.ceil((steps + 1) / max(1, len(dl))) + 1
    rate, _ = _timed(itertools.chain.from_iterable(dl for _ in range(epochs)), steps)
    return rate


def _profile(samples: list[dict], shards: str, tf, size: int, batch: int) -> dict:
    """Per-image microseconds of each stage of this loader, measured in one process on the same data."""
    plan = plan_split(shards, "train", None)
    n = len(samples)
    t0 = time.perf_counter()
    read = sum(1 for _ in read_samples(({"url": u} for u in plan.urls), plan.counts, _Stats(), plan.offsets))
    t_read = (time.perf_counter() - t0) / max(1, read)
    t0 = time.perf_counter()
    imgs = [decode_image(s["jpg"], size) for s in samples]
    t_dec = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    prepped = [tf.prepare(i) for i in imgs]
    t_prep = (time.perf_counter() - t0) / n
    x = torch.stack(prepped[:batch]).float()
    g = torch.Generator().manual_seed(0)
    stages = {}
    for name in ("_geometric", "_motion_blur", "_color_jitter"):
        fn = getattr(tf, name)
        fn(x, g)
        t0 = time.perf_counter()
        for _ in range(5):
            fn(x, g)
        stages[name.strip("_")] = (time.perf_counter() - t0) / (5 * len(x))
    us = {"tar_read": t_read, "jpeg_decode": t_dec, "resize_to_uint8": t_prep, **stages}
    return {k: round(v * 1e6, 1) for k, v in us.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_augment(samples: list[dict], tf, device: torch.device, batch: int, reps: int) -> float:
    """Images/s of the fused augmentation + normalization alone on ``device`` (uint8 batch already there)."""
    x = torch.stack([tf.prepare(decode_image(s["jpg"], tf.size)) for s in samples[:batch]]).to(device)
    g = torch.Generator().manual_seed(0)
    tf.batch(x, g)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        tf.batch(x, g)
    _sync(device)
    return reps * len(x) / (time.perf_counter() - t0)


def _split_figures(
    shards: str,
    samples: list[dict],
    aug,
    data: DataConfig,
    mean_std,
    size: int,
    batch: int,
    workers: int,
    steps: int,
    warmup: int,
    shuffle: int,
    device: torch.device,
    ring: bool = True,
) -> dict:
    """augment.device=model at one size: (a) the uint8 CPU side, (b) device augmentation, (c) both together.

    (a) is the median over ``ROUNDS`` alternations of loader run and decode-limit run (their ratio per round too);
    ``cpu_ratio_to_decode_limit`` is the same ratio in CPU time (decode-limit CPU us/image over the loader's
    workers + main process CPU us/image), the figure that holds on a machine shared with other jobs.
    ``ring=False`` measures the plain per-sample path instead of the shared ring (data.ring).

    One torch thread throughout (as in a DataLoader worker): on a CPU ``device`` the step's augmentation
    then shares the cores with the workers the way a CPU-only run does.
    """
    data = DataConfig(img_size=size, normalize=data.normalize)
    tf = build_transform(aug, data, train=True, mean_std=mean_std)

    def loader():
        return build_loader(
            shards,
            "train",
            None,
            0,
            1,
            workers,
            batch,
            0,
            tf,
            0,
            augment_on="model",
            samples_per_epoch=(steps + warmup + 2 * PREFETCH * workers) * batch,
            shuffle_buffer=shuffle,
            pin_memory=device.type == "cuda",
            ring=ring,
        )

    rounds = []  # alternate loader and decode-limit runs: on a shared machine the load drifts between them
    for _ in range(ROUNDS):  # (the epoch runs past the window: the workers stay busy until it closes)
        cpu: dict = {}
        rate, n = _timed(loader(), steps, warmup, cpu)
        rounds.append(
            (rate, *_parallel_decode_limit(samples, size, max(n, 512), workers, cpu_us=True), cpu["us_per_image"])
        )
    cpu_side, decode = (statistics.median(r[i] for r in rounds) for i in (0, 1))
    ratio = statistics.median(r[0] / r[1] for r in rounds)
    cpu_ratio = [r[2] / r[3] if r[3] else 0.0 for r in rounds]
    dev_rate = _device_augment(samples, tf, device, batch, max(3, steps // 2))
    feed = loader()

    def fed():
        for b in feed:
            feed.to_device(b, device)
            _sync(device)
            yield b

    together, _ = _timed(fed(), steps, warmup)
    return {
        "img_size": size,
        "decode_limit_images_per_s": round(decode, 1),
        "cpu_side": {
            "images_per_s": round(cpu_side, 1),
            "ratio_to_decode_limit": round(ratio, 3),
            "ratio_per_round": [round(r[0] / r[1], 3) for r in rounds],
            "cpu_ratio_to_decode_limit": round(statistics.median(cpu_ratio), 3),
            "cpu_ratio_per_round": [round(c, 3) for c in cpu_ratio],
            "cpu_us_per_image": round(statistics.median(r[3] for r in rounds), 1),
            "decode_limit_cpu_us_per_image": round(statistics.median(r[2] for r in rounds), 1),
            "shared_ring": ring,
        },
        "device_augment": {"device": str(device), "images_per_s": round(dev_rate, 1)},
        "together": {
            "device": str(device),
            "images_per_s": round(together, 1),
            "ratio_to_decode_limit": round(together / decode, 3),
        },
    }


def _options(overrides: list[str]) -> tuple[list[str], list[int] | None, torch.device, bool]:
    """Split the bench's own ``sizes=64,128,224`` / ``device=cuda`` / ``ring=false`` options from config overrides."""
    rest, sizes, device, ring = [], None, "cuda" if torch.cuda.is_available() else "cpu", True
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "sizes":
            try:
                sizes = [int(v) for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            except ValueError:
                raise DistribError(
                    f"bench loader: sizes={value!r}; use a comma list of pixels, e.g. sizes=64,128,224"
                ) from None
        elif key == "device":
            device = value
        elif key == "ring":
            if value.lower() not in ("true", "false", "1", "0"):
                raise DistribError(f"bench loader: ring={value!r}; use ring=true (shared-ring batches) or ring=false")
            ring = value.lower() in ("true", "1")
        else:
            rest.append(o)
    return rest, sizes, torch.device(device), ring


def run(
    shards: str | None = None,
    config: str | None = None,
    out: str | None = None,
    workers: int = 2,
    steps: int = 20,
    overrides=(),
) -> dict:
    if not shards:
        raise DistribError("bench loader needs --shards DIR (a folder written by 'distrib shard')")
    overrides, sizes, device, ring = _options(list(overrides or []))
    cfg = load_config(config, overrides if config else BENCH_DEFAULTS + overrides)
    aug, size, batch = cfg.augment, cfg.data.img_size, cfg.data.batch_size
    index = read_index(shards)
    data = DataConfig(img_size=size, normalize=cfg.data.normalize if cfg.data.normalize != "model" else "imagenet")
    mean_std = resolve_mean_std(data)
    workers, steps = int(workers), int(steps)
    # past the shuffle buffer's fill (it reads 2 samples per yield until full): steady state only
    warmup = 1 + math.ceil(cfg.data.shuffle_buffer / batch)
    tf = build_transform(aug, data, train=True, mean_std=mean_std)
    samples = _samples(shards, limit=max(256, batch * 8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers run single-threaded; the main process should not steal their cores
    scratch = Path(out) if out else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        print(
            f"bench loader: {len(samples)} images at {size}px, {workers} workers, {steps} steps of {batch}",
            file=sys.stderr,
        )
        loader = build_loader(
            shards,
            "train",
            None,
            0,
            1,
            workers,
            batch,
            0,
            tf,
            0,
            samples_per_epoch=(steps + warmup) * batch,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        ours, n = _timed(loader, steps, warmup)
        # the same pipeline without augmentation: separates loader overhead from augmentation cost
        plain = build_loader(
            shards,
            "train",
            None,
            0,
            1,
            workers,
            batch,
            0,
            build_transform(None, data, train=False, mean_std=mean_std),
            0,
            samples_per_epoch=(steps + warmup) * batch,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        no_aug, _ = _timed(plain, steps, warmup)
        decode = _parallel_decode_limit(samples, size, max(n, 512), workers)
        folder = _imagefolder(samples, scratch / "imagefolder", size, aug, mean_std, workers, batch, steps)
        profile = _profile(samples, shards, tf, size, batch)
        split = [
            _split_figures(
                shards,
                samples,
                aug,
                data,
                mean_std,
                s,
                batch,
                workers,
                steps,
                warmup,
                cfg.data.shuffle_buffer,
                device,
                ring,
            )
            for s in (sizes or [size])
        ]
    finally:
        torch.set_num_threads(threads)
        if not out:
            shutil.rmtree(scratch, ignore_errors=True)
    return {
        "bench": "loader",
        "images_per_s": round(ours, 1),
        "ratio_to_decode_limit": round(ours / decode, 3),
        "ratio_to_imagefolder": round(ours / folder, 3),
        "decode_limit_images_per_s": round(decode, 1),
        "no_augment_images_per_s": round(no_aug, 1),
        "no_augment_ratio_to_decode_limit": round(no_aug / decode, 3),
        "imagefolder_images_per_s": round(folder, 1),
        "workers": workers,
        "batch_size": batch,
        "img_size": size,
        "steps": steps,
        "warmup_batches": warmup,
        "images_timed": n,
        "unique_images": len(samples),
        "shards": len(index["shards"]),
        "skipped": loader.skipped,
        "profile_us_per_image": profile,
        "augment_on_model": split,
        "targets": {"ratio_to_decode_limit": 0.85, "ratio_to_imagefolder": 2.0, "cpu_side.ratio_to_decode_limit": 0.85},
    }
