"""The plain loader path's per-sample stages: bytes sample -> uint8 image + label/key/group, counted skips, batches.

``data.loader`` runs them in its DataLoader workers unless whole batches go through the shared ring
(``data.ring``), which reuses ``Stats`` and the same skip rules.
"""

from __future__ import annotations

import json

import torch

from distrib.data.transforms import decode_image
from distrib.errors import DataError


class _Stats:
    """Per-worker corrupt-sample counters; shipped to the main process with each batch."""

    def __init__(self):
        self.tar = 0  # samples lost to a broken/truncated tar stream (index count minus samples read)
        self.decode = 0  # samples read but without a decodable image / label
        self.errors: list[str] = []

    def note(self, kind: str, n: int, msg: str) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if len(self.errors) < 20:
            self.errors.append(msg)

    def as_dict(self) -> dict:
        return {"tar": self.tar, "decode": self.decode, "errors": list(self.errors)}


class _Decoder:
    """bytes sample -> (uint8 CHW image, label, key, group), or None (counted) when it cannot be used.

    With ``raw`` (decode_device=cuda) the image stays JPEG bytes, a 1-D uint8 tensor decoded in the step.
    """

    def __init__(self, transform, stats: _Stats, size: int, raw: bool = False):
        self.transform, self.stats, self.size, self.raw = transform, stats, size, raw
        self.prepare = getattr(transform, "prepare", None)

    def __call__(self, sample: dict):
        key = sample.get("__key__", "?")
        try:
            data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
            if data is None:
                raise DataError(f"no .jpg/.png member (members: {sorted(k for k in sample if not k.startswith('__'))})")
            meta = _json(sample.get("json"))
            label = int(sample["cls"]) if sample.get("cls") is not None else int(meta["label"])
            if self.raw:
                if bytes(data[:3]) != b"\xff\xd8\xff":
                    raise DataError(
                        "not a JPEG; data.decode_device=cuda decodes JPEG only: re-shard with "
                        "'distrib shard' (it stores JPEG) or use data.decode_device=cpu"
                    )
                img = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                img = decode_image(data, self.size)
                img = self.prepare(img) if self.prepare is not None else self.transform(img)
        except Exception as e:  # counted and reported; the stream goes on
            self.stats.note("decode", 1, f"{sample.get('__url__', '?')}:{key}: {type(e).__name__}: {e}")
            return None
        return img, label, str(meta.get("key", key)), str(meta.get("group", key))


def _json(raw) -> dict:
    if raw is None:
        return {}
    return json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)


def _decoded(samples, decode: _Decoder, limit: int):
    """Decodable samples only; ``limit`` failures in a row (more than the split holds) means none decode."""
    bad = 0
    for s in samples:
        out = decode(s)
        if out is not None:
            bad = 0
            yield out
        else:
            bad += 1
            if bad > limit:
                raise DataError(
                    f"{bad} samples in a row failed to decode (e.g. {decode.stats.errors[-1]}); the "
                    f"split has no usable images: check the shards with 'distrib shard inspect'"
                )


def _batches(rows, batch_size: int, partial: bool):
    buf = []
    for r in rows:
        buf.append(r)
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf and partial:
        yield buf
