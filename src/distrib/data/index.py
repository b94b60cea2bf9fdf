"""Shard locations for the loader: read index.json from a path or URL, pick a split's shards, read tar samples.

A location is a local directory, a path/URL to ``index.json``, a URL prefix (``http(s)://``, ``s3://``,
``gs://`` ... opened by webdataset's ``gopen`` or, for schemes it lacks, fsspec), or a
``pipe:`` command with a ``{}`` placeholder for the file name (``pipe:aws s3 cp s3://b/shards/{} -``).
Shard paths in the index are relative to the index's location, so a copied shard folder still works.

Reading. Shards written by ``distrib shard`` record, per sample, the byte offsets of its ``.jpg`` and
``.json`` members (index entry ``offsets``). A local shard with offsets is read with ONE ``os.pread`` per
sample (the jpg header through the json data; the header's name is checked, so a stale index fails
loudly); any other shard (remote, ``pipe:``, or written without offsets) is streamed through tarfile.
Both paths can read a sample range ``[start, stop)`` of a shard, which lets eval split a shard between
ranks/workers when a split has fewer shards than streams.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from urllib.parse import urlparse

from webdataset.tariterators import group_by_keys, tar_file_iterator

from distrib.errors import DataError

wds_gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` is the re-exported function


def _has_scheme(loc: str) -> bool:
    scheme = urlparse(loc).scheme
    return loc.startswith("pipe:") or (len(scheme) > 1 and "://" in loc)


def _locate(index_or_dir: str) -> tuple[str, str]:
    """(index url/path, base template) where ``base.replace('{}', name)`` gives a file next to the index."""
    loc = str(index_or_dir)
    if loc.startswith("pipe:"):
        if "{}" not in loc:
            raise DataError(
                f"pipe location {loc!r} needs a '{{}}' placeholder for the file name, e.g. "
                f"'pipe:curl -s https://host/shards/{{}}'"
            )
        return loc.replace("{}", "index.json"), loc
    if _has_scheme(loc):
        if loc.endswith(".json"):
            return loc, loc.rsplit("/", 1)[0] + "/{}"
        return loc.rstrip("/") + "/index.json", loc.rstrip("/") + "/{}"
    if loc.endswith(".json"):
        return loc, os.path.join(os.path.dirname(os.path.abspath(loc)), "{}")
    return os.path.join(loc, "index.json"), os.path.join(os.path.abspath(loc), "{}")


_GOPEN_SCHEMES = ("pipe", "http", "https", "file", "sftp", "scp", "ftps", "ais", "hf")


def open_url(url: str):
    """A readable binary stream: local paths, pipe: and http(s) via webdataset's gopen; s3://, gs://,
    memory:// and any other scheme via fsspec (which needs its backend package, e.g. s3fs or gcsfs)."""
    scheme = "pipe" if url.startswith("pipe:") else urlparse(url).scheme
    if not _has_scheme(url) or scheme in _GOPEN_SCHEMES:
        return wds_gopen.gopen(url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as e:
        raise DataError(
            f"cannot open {url}: {e}; install the fsspec backend for '{scheme}://' (e.g. s3fs, gcsfs) "
            f"or use a 'pipe:' location such as 'pipe:aws s3 cp {url.rsplit('/', 1)[0]}/{{}} -'"
        ) from e


def read_index(index_or_dir) -> dict:
    """Load ``index.json`` from a shard directory, an index path, or a URL; adds ``_base`` for shard URLs."""
    index_url, base = _locate(str(index_or_dir))
    try:
        if urlparse(index_url).scheme in ("http", "https"):
            import urllib.request

            with urllib.request.urlopen(index_url, timeout=60) as r:
                raw = r.read()
        else:
            with open_url(index_url) as f:
                raw = f.read()
        index = json.loads(raw)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(
            f"no shard index at {index_url}: point data.shards at a folder written by "
            f"'distrib shard' (it holds index.json)"
        ) from e
    except Exception as e:
        raise DataError(
            f"cannot read shard index {index_url}: {type(e).__name__}: {e}; check the location "
            f"(data.shards) and that 'distrib shard' finished writing it"
        ) from e
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DataError(f"{index_url} is not a distrib shard index (no 'shards' list); re-run 'distrib shard'")
    for i, s in enumerate(index["shards"]):
        missing = {"path", "split", "count"} - set(s)
        if missing:
            raise DataError(f"{index_url}: shard entry {i} lacks {sorted(missing)}; re-run 'distrib shard --overwrite'")
    index["_base"] = base
    index["_url"] = index_url
    return index


def _shard_url(base: str, path: str) -> str:
    if _has_scheme(path) or os.path.isabs(path):
        return path
    return base.replace("{}", path)


def _balance(items: list[tuple[str, int]], bins: int) -> list[list[tuple[str, int]]]:
    """Deterministic greedy (largest first) assignment of (url, count) items to ``bins`` bins."""
    out: list[list] = [[] for _ in range(bins)]
    load = [0] * bins
    for url, n in sorted(items, key=lambda it: (-it[1], it[0])):
        b = min(range(bins), key=lambda i: (load[i], len(out[i]), i))
        out[b].append((url, n))
        load[b] += n
    return out


Piece = tuple[str, int, int]  # (shard url, first sample, end sample): a sample range of one shard


@dataclass
class SplitPlan:
    """The shards of one split (and folds) with their index counts; all ranks build the same plan."""

    name: str
    urls: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, list] = field(default_factory=dict)  # url -> per-sample [jpg_off, jpg_len, json_off, json_len]

    @property
    def total(self) -> int:
        return sum(self.counts[u] for u in self.urls)

    def describe(self) -> str:
        return self.name

    def eval_pieces(self, world_size: int, workers: int) -> list[list[list[Piece]]]:
        """[rank][worker] -> sample ranges; every sample of the split is in exactly one range.

        With at least one shard per stream, whole shards are balanced greedily by count; with fewer, the
        split's samples (in index order) are cut into ``world_size * workers`` contiguous, near-equal ranges,
        so a shard may be shared by several streams, each reading only its own range.
        """
        streams = world_size * workers
        if len(self.urls) >= streams:
            ranks = _balance([(u, self.counts[u]) for u in self.urls], world_size)
            return [[[(u, 0, n) for u, n in sorted(w)] for w in _balance(r, workers)] for r in ranks]
        total, pieces = self.total, []
        bounds = [total * i // streams for i in range(streams + 1)]
        for s in range(streams):
            lo, hi, start, mine = bounds[s], bounds[s + 1], 0, []
            for u in self.urls:
                n = self.counts[u]
                a, b = max(lo, start), min(hi, start + n)
                if a < b:
                    mine.append((u, a - start, b - start))
                start += n
            pieces.append(mine)
        return [pieces[r * workers : (r + 1) * workers] for r in range(world_size)]

    def rank_worker_urls(self, rank: int, worker: int, world_size: int, workers: int) -> list[str]:
        return [u for u, _, _ in self.eval_pieces(world_size, workers)[rank][worker]]

    def eval_batches(self, rank: int, world_size: int, workers: int, batch_size: int) -> int:
        """Batches this rank yields in eval mode: each worker batches its own ranges, the last one partial."""
        return sum(
            math.ceil(sum(b - a for _, a, b in w) / batch_size) for w in self.eval_pieces(world_size, workers)[rank]
        )


def plan_split(index_or_dir, split: str, folds: list[int] | None = None) -> SplitPlan:
    """Select ``split``'s shards (for 'train', only ``folds``; None = all folds) from the index."""
    index = index_or_dir if isinstance(index_or_dir, dict) else read_index(index_or_dir)
    shards = index["shards"]
    splits = sorted({s["split"] for s in shards})
    if split not in splits:
        raise DataError(
            f"split {split!r} has no shards in {index['_url']} (it has: {', '.join(splits)}); "
            f"shard it with 'distrib shard --{split} MANIFEST.csv' or pick another split"
        )
    chosen = [s for s in shards if s["split"] == split]
    name = f"split '{split}'"
    if split == "train" and folds is not None:
        have = sorted({int(s.get("fold", -1)) for s in chosen})
        unknown = [f for f in folds if f not in have]
        if unknown or not folds:
            raise DataError(
                f"train folds {folds} not all in {index['_url']} (folds present: {have}); "
                f"use data.fold within 0..{len(have) - 1} or re-shard with more --folds"
            )
        chosen = [s for s in chosen if int(s.get("fold", -1)) in set(folds)]
        name = f"split 'train' folds {sorted(folds)}"
    urls = [_shard_url(index["_base"], s["path"]) for s in chosen]
    offsets = {
        u: s["offsets"]
        for u, s in zip(urls, chosen)
        if s.get("offsets") and len(s["offsets"]) == int(s["count"]) and _local_path(u) is not None
    }
    return SplitPlan(
        name=f"{name} of {index['_url']}",
        urls=urls,
        counts={u: int(s["count"]) for u, s in zip(urls, chosen)},
        offsets=offsets,
    )


def _local_path(url: str) -> str | None:
    """The file path of a local shard (plain path or file://), else None (read by streaming)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if _has_scheme(url) else url


def read_samples(src, counts: dict[str, int], stats, offsets: dict[str, list] | None = None, reader=None):
    """Tar samples (dicts of member bytes) from ``{'url': ..., 'start': i, 'stop': j}`` items (range optional).

    Shards with ``offsets`` (local files) are read by ``pread``; others are streamed; ``reader`` (same
    signature as ``_pread_samples``) replaces both (the shared-ring loader yields sample positions). Broken streams are
    counted in ``stats``. ``src`` may be endless (training); a run of more than twice the number of shards
    yielding nothing means no shard is readable, which is raised instead of spinning forever.
    """
    empty_run, last_error, offsets = 0, "", offsets or {}
    for item in src:
        url = item["url"]
        if empty_run > 2 * max(2, len(counts)):
            raise DataError(
                f"{empty_run} shard reads in a row gave no samples (last: {url}: {last_error or 'empty'}); "
                f"check the shard location and run 'distrib shard inspect' on it"
            )
        start = int(item.get("start", 0))
        stop = int(item.get("stop", counts.get(url, 1 << 62)))
        want = max(0, min(stop, counts.get(url, stop)) - start)
        n, finished = 0, False
        read = reader or (_pread_samples if url in offsets else _stream_samples)
        try:
            for s in read(url, start, stop, offsets.get(url), counts):
                n += 1
                yield s
            finished = True
        except DataError:
            raise
        except Exception as e:  # truncated or corrupt tar: the rest of this range is lost, counted below
            finished = True
            last_error = f"{type(e).__name__}: {e}"
            stats.note("tar", 0, f"{url}: {last_error}")
        finally:
            if finished and n < want:  # not on early exit (end of a training epoch)
                stats.note("tar", want - n, f"{url}: read {n} of {want} samples")
        empty_run = empty_run + 1 if n == 0 else 0


def _stream_samples(url: str, start: int, stop: int, _offsets, counts: dict[str, int]):
    """Samples ``start..stop-1`` of a tar stream (the ones before ``start`` are read and dropped)."""
    stream = open_url(url)
    try:
        files = tar_file_iterator(stream)
        for i, s in enumerate(group_by_keys({**f, "__url__": url} for f in files)):
            if i >= counts.get(url, i + 1):
                raise DataError(
                    f"shard {url} holds more samples than index.json's count {counts[url]}; "
                    f"the index is stale: re-run 'distrib shard --overwrite'"
                )
            if i >= stop:
                return
            if i >= start:
                yield s
    finally:
        try:
            stream.close()
        except Exception:
            pass


def _pread_samples(url: str, start: int, stop: int, offsets: list, _counts):
    """Samples ``start..stop-1`` of a local shard, one ``os.pread`` each (jpg header .. json data)."""
    fd = os.open(_local_path(url), os.O_RDONLY)
    try:
        for i in range(start, min(stop, len(offsets))):
            jpg_off, jpg_len, json_off, json_len = offsets[i]
            head = jpg_off - tarfile.BLOCKSIZE
            buf = os.pread(fd, json_off + json_len - head, head)
            if len(buf) < json_off + json_len - head:
                raise EOFError(f"shard ends inside sample {i} (truncated copy?)")
            name = buf[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            key, _, ext = name.partition(".")
            if ext not in ("jpg", "jpeg", "png"):
                raise DataError(
                    f"shard {url}: sample {i} of index.json's offsets points at {name!r}, not an image "
                    f"member; the index is stale: re-run 'distrib shard --overwrite'"
                )
            base = tarfile.BLOCKSIZE
            yield {
                "__key__": key,
                "__url__": url,
                ext: buf[base : base + jpg_len],
                "json": buf[json_off - head : json_off - head + json_len],
            }
    finally:
        os.close(fd)
