"""Shared-memory ring for uint8 batches: whole batches built in the DataLoader workers, no tensor IPC.

Used by ``loader.build_loader`` when batches stay uint8 (``augment_on="model"``: augmentation and
normalization run in ``Loader.to_device`` on the model's device), the transform is an ``ImageTransform``,
there is at least one worker and every shard of the split is a local file with ``offsets`` in the index.

Why. Every tensor a DataLoader worker yields gets a fresh shared-memory segment, a copy, and an fd sent over
its own socket connection: about 1 ms of CPU per tensor per batch, more than decoding a 64 px batch. Here one
uint8 NHWC ring ``[workers, slots, B, S, S, 3]`` is allocated ONCE, before the workers fork; a worker
decodes each JPEG straight into its slot (simplejpeg ``buffer=`` when the image is already S x S, else
``decode_image`` + ``ImageTransform.resized``, the pixels of ``prepare``, and one copy) and sends only
``(slot, n)``, the batch index and its skip counts. The sample positions go into a shared ``rows`` array;
the main process maps them to label/key/group from ``SplitMeta`` (read once from the shards' .json
members), so no strings or tensors cross the process boundary.

Order and counts are the plain path's: the same shard chain, the same seeded shuffle (over sample
positions instead of sample bytes), the same truncation check (the shard's file size against the
index offsets), the same per-sample skip rules; only where the bytes are read and where the pixels land
differ, so both paths yield identical batches (tests/test_ring.py).

Slot lifetime (the contract). Each worker has ``slots = prefetch + 2`` slots guarded by a semaphore. The
main process releases the slot of batch ``t`` when batch ``t + 2`` is requested (one batch later than
needed, so the previous batch is still intact while the step for the current one runs). If the yielded
``batch["image"]`` object is still referenced at that point (e.g. ``list(loader)``), it is first moved to
a private copy (``Tensor.set_``), so a kept batch never changes; views made from it are NOT protected:
copy what you keep. ``Loader.to_device`` always returns a new tensor (the float conversion), so the
trainer, evaluate and embed copy out of the ring before the slot can be reused. With ``pin_memory`` on
CUDA the ring is page-locked once (``cudaHostRegister``) and a slot is released only after the event
recorded behind its host-to-device copy has completed.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing as mp
import os
import tarfile
import weakref

import numpy as np
import simplejpeg
import torch

from distrib.data.index import SplitPlan, _local_path
from distrib.data.transforms import ImageTransform, decode_image
from distrib.errors import DataError

log = logging.getLogger(__name__)
_META_CACHE: dict[tuple, tuple] = {}  # (path, size, mtime_ns) -> per-sample (labels, keys, groups, bad, hw)
_IMAGE_EXT = (b".jpg", b".jpeg", b".png")


def ring_usable(plan: SplitPlan, transform, on_device: bool, decode_on_device: bool, workers: int) -> bool:
    """True when ``build_loader`` should build batches in the shared ring (see the module doc)."""
    return (
        on_device
        and not decode_on_device
        and workers >= 1
        and isinstance(transform, ImageTransform)
        and type(transform).prepare is ImageTransform.prepare  # a subclass's own prepare: the plain path
        and bool(plan.urls)
        and all(u in plan.offsets for u in plan.urls)
    )


def _shard_meta(path: str, offsets: list) -> tuple:
    """(labels, keys, groups, bad, hw) of one shard from its .json members (one pread each), cached per file
    version; ``hw`` is the image's (height, width) when the writer recorded it, else (0, 0)."""
    st = os.stat(path)
    cache_key = (path, st.st_size, st.st_mtime_ns, len(offsets))
    if cache_key in _META_CACHE:
        return _META_CACHE[cache_key]
    labels, keys, groups, bad, hw = [], [], [], [], []
    fd = os.open(path, os.O_RDONLY)
    try:
        for jpg_off, _jpg_len, json_off, json_len in (o[:4] for o in offsets):
            raw = os.pread(fd, json_len, json_off) if json_off + json_len <= st.st_size else b""
            try:
                meta = json.loads(raw)
                label = int(meta["label"])  # the plain path's rule for pread samples (no .cls member read)
                ok = True
            except Exception:  # unreadable (or beyond a truncated end): skipped as "decode" when reached
                meta, label, ok = {}, 0, False
            key = meta.get("key")
            if key is None:
                head = os.pread(fd, 100, jpg_off - tarfile.BLOCKSIZE)
                key = head.split(b"\0", 1)[0].decode("utf-8", "replace").partition(".")[0]
            labels.append(label)
            keys.append(str(key))
            groups.append(str(meta.get("group", key)))
            bad.append(not ok)
            hw.append((int(meta.get("height", 0)), int(meta.get("width", 0))) if ok else (0, 0))
    finally:
        os.close(fd)
    _META_CACHE[cache_key] = out = (labels, keys, groups, bad, hw)
    return out


class SplitMeta:
    """Per-sample label/key/group of a split; global position = ``base[url] + position in the shard``."""

    def __init__(self, plan: SplitPlan):
        self.base: dict[str, int] = {}
        labels, self.keys, self.groups, self.bad, self.hw = [], [], [], [], []
        for url in plan.urls:
            self.base[url] = len(labels)
            lab, keys, groups, bad, hw = _shard_meta(_local_path(url), plan.offsets[url])
            labels += lab
            self.keys += keys
            self.groups += groups
            self.bad += bad
            self.hw += hw
        self.labels = np.asarray(labels, dtype=np.int64)


def positions(url: str, start: int, stop: int, offsets: list, _counts):
    """``read_samples`` reader: the shard's sample positions ``(url, i)``, no bytes read; a sample that ends
    past the file's end stops the range as a truncated read does on the plain path."""
    size = os.stat(_local_path(url)).st_size
    for i in range(start, min(stop, len(offsets))):
        _, _, json_off, json_len = offsets[i][:4]
        if json_off + json_len > size:
            raise EOFError(f"shard ends inside sample {i} (truncated copy?)")
        yield (url, i)


class Ring:
    """The shared uint8 ring, its row table and per-worker slot semaphores (main-process object, forked)."""

    def __init__(self, plan: SplitPlan, transform: ImageTransform, workers: int, batch_size: int, prefetch: int):
        self.plan, self.transform, self.size = plan, transform, transform.size
        self.workers, self.batch_size, self.slots = workers, batch_size, prefetch + 2
        self.meta = SplitMeta(plan)
        self.images = self.rows = None
        self.free: list = []
        self._held: collections.deque = collections.deque()
        self._pinned = False

    # ---- main process ----
    def start(self, pin: bool = False) -> None:
        """Allocate (once) and reset the semaphores; call before the DataLoader forks its workers (one pass
        at a time: ``Loader.__iter__`` closes an unfinished earlier pass, and so its workers, first)."""
        if self.images is None:
            shape = (self.workers, self.slots, self.batch_size, self.size, self.size, 3)
            self.images = torch.empty(shape, dtype=torch.uint8).share_memory_()
            self.rows = torch.full(shape[:3], -1, dtype=torch.long).share_memory_()
            self._rows = self.rows.numpy()
        if pin and not self._pinned and torch.cuda.is_available():  # page-locked once: async H2D from the slots
            err = torch.cuda.cudart().cudaHostRegister(self.images.data_ptr(), self.images.numel(), 0)
            self._pinned = int(getattr(err, "value", err)) == 0
            if not self._pinned:
                log.warning(
                    "cudaHostRegister of the %d MB loader ring failed (%s): host-to-device copies from "
                    "it are synchronous",
                    self.images.numel() >> 20,
                    err,
                )
        self._release(keep=0)  # batches of an earlier pass that are still referenced get private copies
        self.free = [mp.get_context("fork").Semaphore(self.slots) for _ in range(self.workers)]

    def batch(self, item: dict) -> dict:
        """The batch of a worker's ``(slot, n)`` message: an NCHW (channels_last) view of the slot + labels."""
        w, k, n = item["worker"], item["slot"], item["n"]
        self._release(keep=1)
        rows = self._rows[w, k, :n]
        image = self.images[w, k, :n].permute(0, 3, 1, 2)
        self._held.append([w, weakref.ref(image), None])
        m, at = self.meta, rows.tolist()
        return {
            "image": image,
            "label": torch.from_numpy(m.labels[rows]),
            "key": [m.keys[i] for i in at],
            "group": [m.groups[i] for i in at],
            "index": item["index"],
        }

    def copied(self, image: torch.Tensor, event) -> None:
        """``to_device`` moved ``image`` off the host: its slot may be reused once ``event`` completes."""
        for h in self._held:
            if h[1]() is image:
                h[2] = event

    def _release(self, keep: int) -> None:
        while len(self._held) > keep:
            w, ref, event = self._held.popleft()
            image = ref()
            if event is not None:
                event.synchronize()
            if image is not None:  # still referenced by the caller: give it a private copy first
                image.set_(image.clone(memory_format=torch.preserve_format))
            self.free[w].release()

    def finish(self) -> None:
        self._release(keep=0)

    # ---- worker process ----
    def fill(self, worker: int, stats, limit: int):
        """``items -> (slot, n)`` batches of ``worker``: decode each sample into the slot, skipping (and
        counting) unusable ones as the plain path's ``_decoded`` does."""
        images, rows, free = self.images[worker].numpy(), self.rows[worker].numpy(), self.free[worker]
        meta, fds, size, offsets = self.meta, {}, self.size, self.plan.offsets
        square = (size, size)

        def decode_into(url: str, i: int, hw: tuple, out: np.ndarray) -> None:
            jpg_off, jpg_len = offsets[url][i][:2]
            fd = fds.get(url)
            if fd is None:
                fd = fds[url] = os.open(_local_path(url), os.O_RDONLY)
            buf = os.pread(fd, tarfile.BLOCKSIZE + jpg_len, jpg_off - tarfile.BLOCKSIZE)
            end = buf.find(b"\0", 0, 100)  # the tar header's NUL-padded 100-byte name field
            if not buf[: end if end >= 0 else 100].endswith(_IMAGE_EXT):
                name = buf[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                raise DataError(
                    f"shard {url}: sample {i} of index.json's offsets points at {name!r}, not an image "
                    f"member; the index is stale: re-run 'distrib shard --overwrite'"
                )
            data = memoryview(buf)[tarfile.BLOCKSIZE :]
            if len(data) != jpg_len:
                raise EOFError(f"shard ends inside sample {i} (truncated copy?)")
            try:  # already S x S (the writer's recorded size, else the JPEG header): decode into the slot
                if hw == square or (hw[0] == 0 and tuple(simplejpeg.decode_jpeg_header(data)[:2]) == square):
                    simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
                    return
            except Exception:  # not a JPEG, or a JPEG simplejpeg rejects: decode_image decides, as on the plain path
                pass
            out[...] = self.transform.resized(decode_image(bytes(data), size))  # prepare's pixels, one copy

        def batches(items, batch_size: int, partial: bool):
            made, bad_run = 0, 0
            try:
                it = iter(items)
                while True:
                    free.acquire()
                    k = made % self.slots
                    j = 0
                    for url, i in it:
                        g = meta.base[url] + i
                        try:
                            if meta.bad[g]:
                                raise DataError("no usable label in the .json member")
                            decode_into(url, i, meta.hw[g], images[k, j])
                        except DataError as e:
                            if "index is stale" in str(e):
                                raise
                            err = e
                        except Exception as e:  # counted and reported; the stream goes on
                            err = e
                        else:
                            rows[k, j] = g
                            j, bad_run = j + 1, 0
                            if j == batch_size:
                                break
                            continue
                        stats.note("decode", 1, f"{url}:{meta.keys[g]}: {type(err).__name__}: {err}")
                        bad_run += 1
                        if bad_run > limit:
                            raise DataError(
                                f"{bad_run} samples in a row failed to decode (e.g. {stats.errors[-1]}); "
                                f"the split has no usable images: check the shards with "
                                f"'distrib shard inspect'"
                            )
                    if j == batch_size or (j and partial):
                        made += 1
                        yield k, j
                        if j == batch_size:
                            continue
                    free.release()  # the stream ended: this slot was never handed out
                    return
            finally:
                for fd in fds.values():
                    os.close(fd)

        return batches
