"""DDP-safe WebDataset loader: equal batch counts on every rank, exactly-once eval, counted corrupt samples.

Method. ``rank``/``world_size`` are arguments (never read from env or torch.distributed); every
number below is computed from ``index.json`` alone, so all ranks agree without communicating.

* Training (``mode="train"``): each (rank, DataLoader worker) pair is one *stream* ``i`` of
  ``S = world_size * max(1, num_workers)``. The shard order is an endless chain of permutations of
  the training shards, permutation ``r`` drawn from ``(seed, epoch, r)``; stream ``i`` reads
  positions ``i, i+S, i+2S, ...`` (a chunked shard sampler: resampled, but near-uniform coverage even
  with few shards). Samples go through a shuffle buffer seeded by ``(seed, epoch, rank, worker)``
  and each stream stops after a fixed number of batches (webdataset ``with_epoch``), so every rank
  yields exactly ``ceil(samples_per_epoch / (world_size * batch_size))`` full batches whatever the
  shard sizes, and skipped corrupt samples are simply replaced by the next ones.
* Eval (``mode="eval"``): shards are assigned to ranks, then to workers, by a deterministic
  greedy balance of their index counts; with fewer shards than ``world_size * max(1, num_workers)``
  streams the split is cut into contiguous sample ranges inside shards instead
  (``SplitPlan.eval_pieces``). Either way every sample is read exactly once across ranks. Every
  batch has ``batch_size`` rows; short batches and extra batches (up to the largest rank's count)
  are padding rows with ``valid=False`` so metrics can drop them.
* Augmentation: batch ``i`` of a rank's epoch is augmented with a generator seeded by
  ``(seed, epoch, rank, i)``. With ``augment_on="loader"`` the workers apply ``transform.batch``;
  with ``"model"`` they yield uint8 and ``Loader.to_device`` applies the same call after the
  transfer, on the model's device (so both placements give the same images on CPU). With
  ``decode_on="cuda"`` (training only) the workers ship the JPEG bytes and ``to_device`` decodes them
  in one batched nvjpeg call first.

No webdataset node/worker splitter reads the rank from the environment: ``split_by_node`` is never
used, and the (rank, worker) -> shards assignment above is explicit in both modes.

Corrupt data (a tar member that breaks the stream, a truncated shard, an undecodable image) is
skipped and counted in the worker; counts travel with every batch and a final stats message, and
``Loader.report()`` sums them per epoch (also logged as a warning on every rank).
"""

from __future__ import annotations

import logging
import math
import random
import weakref
from collections.abc import Callable

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distrib.data.decode import _batches, _decoded, _Decoder, _Stats  # noqa: F401 (_Stats: bench, tests)
from distrib.data.index import SplitPlan, plan_split, read_samples
from distrib.data.ring import Ring, positions, ring_usable
from distrib.data.transforms import decode_batch
from distrib.errors import DataError

log = logging.getLogger("distrib.data.loader")
_STATS = "__stats__"
PREFETCH = 4  # batches in flight per DataLoader worker (the ring has PREFETCH + 2 slots per worker)


def folds_for(split_fold: int, k: int) -> list[int]:
    """Training folds when fold ``split_fold`` is the validation fold (-1: train on all ``k`` folds)."""
    if split_fold >= k:
        raise DataError(
            f"data.fold={split_fold} but the shards have {k} folds (0..{k - 1}); pick one of those "
            f"or -1 to train on every fold and validate on the 'val' split"
        )
    return [f for f in range(k) if f != split_fold]


train_folds = folds_for


def _stream_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (FNV-style), identical in every process and Python version."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class _ShardChain(IterableDataset):
    """Endless shard URLs for one training stream: permutation r of all shards, every S-th position."""

    def __init__(self, urls: list[str], seed: int, epoch: int, stream: int, streams: int):
        self.urls, self.seed, self.epoch, self.stream, self.streams = urls, seed, epoch, stream, streams

    def __iter__(self):
        n, pos, rnd = len(self.urls), self.stream, 0
        perm = []
        while True:
            while pos >= len(perm):  # extend the chain by one epoch-seeded permutation
                order = list(range(n))
                random.Random(_stream_seed(self.seed, self.epoch, rnd)).shuffle(order)
                perm.extend(order)
                rnd += 1
            yield {"url": self.urls[perm[pos]]}
            pos += self.streams
            if pos > 4 * n + self.streams:  # drop the consumed prefix so memory stays bounded
                drop = (pos // n - 1) * n
                perm, pos = perm[drop:], pos - drop


def batch_generator(seed: int, epoch: int, rank: int, index: int) -> torch.Generator:
    """The CPU generator that augments batch ``index`` of ``rank``'s epoch (same in workers and in the step)."""
    return torch.Generator().manual_seed(_stream_seed(seed, epoch, rank, index, 1))


class _Stream(IterableDataset):
    """One rank's dataset; ``__iter__`` runs inside each DataLoader worker (or the main process)."""

    def __init__(
        self,
        plan: SplitPlan,
        mode: str,
        transform: Callable,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        num_workers: int,
        batches: int,
        shuffle_buffer: int,
        augment_on: str = "loader",
        decode_on: str = "cpu",
    ):
        self.plan, self.mode, self.transform = plan, mode, transform
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.batches, self.shuffle_buffer = batches, shuffle_buffer
        self.on_device = augment_on == "model" and hasattr(transform, "batch")
        self.decode_on_device = decode_on != "cpu" and self.on_device and mode == "train"
        self.ring = None  # a data.ring.Ring when whole uint8 batches are built in shared memory (build_loader)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stats, limit = _Stats(), self.plan.total + 1
        if self.ring is not None:  # positions only; the batcher decodes into the worker's ring slot
            read, fill = positions, self.ring.fill(worker, stats, limit)
        else:
            read, decode = (
                None,
                _Decoder(self.transform, stats, getattr(self.transform, "size", 0), raw=self.decode_on_device),
            )

            def fill(src, batch_size, partial):
                return _batches(_decoded(src, decode, limit), batch_size, partial)

        offsets = self.plan.offsets
        if self.mode == "train":
            stream = self.rank * self.num_workers + worker
            nb = self.batches // self.num_workers + (1 if worker < self.batches % self.num_workers else 0)
            pipe = wds.DataPipeline(
                _ShardChain(self.plan.urls, self.seed, self.epoch, stream, self.world_size * self.num_workers),
                lambda src: read_samples(src, self.plan.counts, stats, offsets, read),
                wds.shuffle(
                    self.shuffle_buffer,
                    initial=min(self.shuffle_buffer, 100),
                    rng=random.Random(_stream_seed(self.seed, self.epoch, self.rank, worker, 2)),
                ),
                lambda src: fill(src, self.batch_size, False),
            ).with_epoch(nbatches=nb)
            if nb == 0:
                pipe = []
        else:
            pieces = self.plan.eval_pieces(self.world_size, self.num_workers)[self.rank][worker]
            samples = read_samples(
                ({"url": u, "start": a, "stop": b} for u, a, b in pieces), self.plan.counts, stats, offsets, read
            )
            pipe = fill(samples, self.batch_size, True)
        for i, rows in enumerate(pipe):
            index = i * self.num_workers + worker  # DataLoader takes batches from its workers round-robin
            if self.ring is not None:  # only the slot crosses the process boundary
                yield {"slot": rows[0], "n": rows[1], "index": index, "worker": worker, _STATS: stats.as_dict()}
                continue
            gen = None if self.on_device else batch_generator(self.seed, self.epoch, self.rank, index)
            yield _collate(
                rows, self.transform if gen is not None else None, gen, worker, stats, index, raw=self.decode_on_device
            )
        yield {_STATS: stats.as_dict(), "worker": worker}


def _collate(rows, transform, gen, worker: int, stats: _Stats, index: int, raw: bool = False) -> dict:
    """A batch dict; ``transform.batch`` runs here unless it is deferred to the step (``transform`` None)."""
    first = rows[0][0]
    if raw:  # JPEG bytes of different lengths (decode_device=cuda): a list, decoded in the step
        imgs = [r[0] for r in rows]
    elif first.ndim == 3 and first.permute(1, 2, 0).is_contiguous():  # CHW views of HWC arrays (ImageTransform.prepare)
        # stack the HWC memory (a plain copy) and view it as NCHW in channels_last layout: stacking the
        # CHW views would transpose every image (~50 us at 64 px, more than the JPEG decode)
        imgs = torch.stack([r[0].permute(1, 2, 0) for r in rows]).permute(0, 3, 1, 2)
    else:
        imgs = torch.stack([r[0] for r in rows])
    if hasattr(transform, "batch"):
        imgs = transform.batch(imgs, gen)
    # labels travel as a list: every tensor a worker sends costs a shared-memory segment + fd; the main
    # process makes the label/valid tensors (Loader.__iter__)
    return {
        "image": imgs,
        "label": [r[1] for r in rows],
        "key": [r[2] for r in rows],
        "group": [r[3] for r in rows],
        "index": index,
        "worker": worker,
        _STATS: stats.as_dict(),
    }


def _as_is(item):
    """The DataLoader's collate_fn: batches are already collated (its default_convert would walk every key string)."""
    return item


class Loader:
    """Iterable over one epoch of dict batches; every rank yields exactly ``len(self)`` batches."""

    def __init__(
        self, stream: _Stream, num_workers: int, batches: int, mode: str, batch_size: int, pin_memory: bool = False
    ):
        self.stream, self.num_workers, self.batches = stream, num_workers, batches
        self.mode, self.batch_size, self.pin_memory = mode, batch_size, pin_memory
        self._worker_stats: dict[int, dict] = {}
        self._template: dict | None = None
        self._live = None  # weakref to the running pass (shared-ring loaders)
        self.samples = 0  # real (valid) samples yielded in the last iteration
        self.padding = 0  # padding rows (valid=False) yielded in the last iteration

    def __len__(self) -> int:
        return self.batches

    @property
    def skipped(self) -> int:
        return sum(s["tar"] + s["decode"] for s in self._worker_stats.values())

    def report(self) -> dict:
        """Corrupt/skipped counts and sizes of the last epoch on this rank."""
        tar = sum(s["tar"] for s in self._worker_stats.values())
        dec = sum(s["decode"] for s in self._worker_stats.values())
        errors = [e for s in self._worker_stats.values() for e in s["errors"]]
        return {
            "rank": self.stream.rank,
            "epoch": self.stream.epoch,
            "mode": self.mode,
            "batches": self.batches,
            "samples": self.samples,
            "padding": self.padding,
            "skipped": tar + dec,
            "skipped_tar": tar,
            "skipped_decode": dec,
            "errors": errors[:20],
        }

    def to_device(self, batch: dict, device, channels_last: bool = False) -> torch.Tensor:
        """The batch's images on ``device``, ready for the model.

        With augment_on="model" the uint8 batch is moved first and the transform's fused augmentation +
        normalization runs on ``device`` (seeded by the batch's (seed, epoch, rank, index)); with
        decode_on="cuda" the JPEG bytes are decoded there before that.
        """
        st, images = self.stream, batch["image"]
        if isinstance(images, list):
            images = decode_batch(images, st.transform.size, device)
        else:
            images = images.to(device, non_blocking=True)
            if st.ring is not None and images.device.type == "cuda":  # the slot is reusable once the copy is done
                event = torch.cuda.Event()
                event.record()
                st.ring.copied(batch["image"], event)
        if st.on_device:
            images = st.transform.batch(images, batch_generator(st.seed, st.epoch, st.rank, batch.get("index", 0)))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if st.ring is not None and images.data_ptr() == batch["image"].data_ptr():
            images = images.clone()  # never hand out ring memory: the slot is refilled two batches later
        return images

    def __iter__(self):
        live = self._live() if self._live is not None else None
        if live is not None:  # one pass at a time: an unfinished earlier pass stops (its workers share the ring)
            live.close()
        gen = self._epoch()
        self._live = weakref.ref(gen) if self.stream.ring is not None else None
        return gen

    def _epoch(self):
        self._worker_stats, self.samples, self.padding = {}, 0, 0
        ring = self.stream.ring
        if ring is not None:  # before the fork: the workers inherit the ring and its semaphores
            ring.start(pin=self.pin_memory)
        st = self.stream
        dl = DataLoader(
            st,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and ring is None,
            collate_fn=_as_is,
            persistent_workers=False,
            prefetch_factor=PREFETCH if self.num_workers else None,
            # every DataLoader pass draws its workers' base seed from this generator, else from the global
            # torch RNG: a validation pass would then shift the dropout masks of the steps after it, and
            # train.eval_every_epochs (allowed to change on --resume) would change the trained weights
            generator=torch.Generator().manual_seed(_stream_seed(st.seed, st.epoch, st.rank, 3)),
        )
        done = 0
        for item in dl:
            self._worker_stats[int(item["worker"])] = item.pop(_STATS)
            if "slot" in item:
                item = ring.batch(item)
            elif "image" not in item:
                continue
            item.pop("worker", None)
            if done >= self.batches:
                raise DataError(
                    f"rank {self.stream.rank} read more batches than index.json promises "
                    f"({self.batches}); the index is stale: re-run 'distrib shard --overwrite'"
                )
            real = len(item["key"])
            item["label"] = torch.as_tensor(item["label"], dtype=torch.long)
            item["valid"] = torch.ones(real, dtype=torch.bool)
            item = self._pad(item)
            self.samples += real
            done += 1
            yield item
        if done < self.batches and self.mode == "train":
            raise DataError(
                f"rank {self.stream.rank}: training stream ended after {done} of {self.batches} "
                f"batches: every shard is empty or unreadable ({self.report()['errors'][:3]})"
            )
        while done < self.batches:  # eval: top up to the common batch count with padding
            item = self._pad(None)
            done += 1
            yield item
        if ring is not None:
            ring.finish()
        rep = self.report()
        if rep["skipped"]:
            log.warning(
                "rank %d epoch %d: skipped %d corrupt samples (%d lost in broken tar streams, %d "
                "undecodable); first: %s",
                rep["rank"],
                rep["epoch"],
                rep["skipped"],
                rep["skipped_tar"],
                rep["skipped_decode"],
                rep["errors"][:1],
            )

    def _pad(self, item: dict | None) -> dict:
        if item is not None and self._template is None and torch.is_tensor(item["image"]):
            self._template = {"image": torch.zeros_like(item["image"][:1])}
        n = 0 if item is None else len(item["key"])
        pad = self.batch_size - n
        if pad <= 0:
            return item
        if self._template is None:  # no real batch on this rank yet: learn the shape from the transform
            import numpy as np

            tf = self.stream.transform
            probe = (tf.prepare if self.stream.on_device else tf)(np.zeros((8, 8, 3), dtype=np.uint8))
            self._template = {"image": torch.zeros_like(probe)[None]}
        self.padding += pad
        fill = {
            "image": self._template["image"].expand(pad, *self._template["image"].shape[1:]),
            "label": torch.zeros(pad, dtype=torch.long),
            "key": [""] * pad,
            "group": [""] * pad,
            "valid": torch.zeros(pad, dtype=torch.bool),
        }
        if item is None:
            return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in fill.items()}
        extra = {k: v for k, v in item.items() if k not in fill}  # e.g. the batch index that seeds augmentation
        return {
            **extra,
            **{k: (torch.cat([item[k], fill[k]]) if torch.is_tensor(fill[k]) else item[k] + fill[k]) for k in fill},
        }


def build_loader(
    index_or_dir: str,
    split: str,
    folds: list[int] | None,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    epoch: int,
    transform: Callable,
    seed: int,
    mode: str = "train",
    samples_per_epoch: int = 0,
    shuffle_buffer: int = 1000,
    augment_on: str = "loader",
    decode_on: str = "cpu",
    pin_memory: bool = False,
    ring: bool = True,
) -> Loader:
    """One epoch of ``split`` (``folds`` for split='train') for ``rank`` of ``world_size``; see the module doc.

    ``augment_on``: "loader" (workers run ``transform.batch``) or "model" (``Loader.to_device`` does);
    ``decode_on``: "cpu" or "cuda" (JPEG decode in ``to_device``; needs augment_on="model", training only).
    ``ring``: build uint8 batches in a shared-memory ring when ``data.ring.ring_usable`` (False: the plain path).
    """
    if mode not in ("train", "eval"):
        raise DataError(f"build_loader mode={mode!r}; use 'train' or 'eval'")
    if augment_on not in ("loader", "model") or decode_on not in ("cpu", "cuda"):
        raise DataError(
            f"build_loader augment_on={augment_on!r} decode_on={decode_on!r}; use 'loader'/'model' "
            "and 'cpu'/'cuda' (resolve augment.device=auto with transforms.augment_placement)"
        )
    if decode_on != "cpu" and augment_on != "model":
        raise DataError("decode_on='cuda' needs augment_on='model': the decoded batch never returns to the workers")
    if not (0 <= rank < world_size):
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or num_workers < 0:
        raise DataError(f"batch_size={batch_size} and num_workers={num_workers}; need batch_size >= 1, workers >= 0")
    plan = plan_split(index_or_dir, split, folds)
    if mode == "train":
        total = samples_per_epoch or plan.total
        batches = max(1, math.ceil(total / (world_size * batch_size)))
    else:
        batches = max(plan.eval_batches(r, world_size, max(1, num_workers), batch_size) for r in range(world_size))
    stream = _Stream(
        plan,
        mode,
        transform,
        batch_size,
        seed,
        epoch,
        rank,
        world_size,
        num_workers,
        batches,
        shuffle_buffer,
        augment_on,
        decode_on,
    )
    if ring and ring_usable(plan, transform, stream.on_device, stream.decode_on_device, num_workers):
        stream.ring = Ring(plan, transform, num_workers, batch_size, PREFETCH)
    return Loader(stream, num_workers, batches, mode, batch_size, pin_memory)
