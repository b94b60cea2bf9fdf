"""Mild image manipulations for the demo dataset: region resampling, splice, double JPEG, upsampling.

Each takes a context crop (the tile plus a margin on every side, float32 RGB 0-255) and returns the
manipulated tile without its margin, so real and manipulated tiles share the same source pixels and
differ only by the manipulation. None of them shifts the colour histogram on purpose: a histogram
classifier must stay at chance (see ``demo_checks.histogram_leak_check``).
"""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image

KINDS = ("resample", "splice", "double_jpeg", "upsample")


def center(ctx: np.ndarray, margin: int) -> np.ndarray:
    """The tile inside a context crop."""
    return ctx[margin : ctx.shape[0] - margin, margin : ctx.shape[1] - margin]


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode + decode with the same settings as the final save, so compression history is shared."""
    return simplejpeg.decode_jpeg(encode_jpeg(img, quality)).astype(np.float32)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a float/uint8 RGB array; 4:2:0 for every tile of both classes."""
    arr = np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return simplejpeg.encode_jpeg(arr, quality=int(quality), colorspace="RGB", colorsubsampling="420")


def _resize(img: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """Resize per channel in float mode so no 8-bit rounding is added; size is (w, h)."""
    chans = [
        np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(size, resample))
        for c in range(img.shape[2])
    ]
    return np.stack(chans, axis=-1)


def _region(rng: np.random.Generator, tile: int, lo: float, hi: float) -> tuple[int, int, int, int]:
    """A random rectangle (y, x, h, w) covering a mild share of the tile."""
    h = int(rng.integers(int(tile * lo), int(tile * hi) + 1))
    w = int(rng.integers(int(tile * lo), int(tile * hi) + 1))
    y = int(rng.integers(0, tile - h + 1))
    x = int(rng.integers(0, tile - w + 1))
    return y, x, h, w


def resample_region(ctx: np.ndarray, margin: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Down- then up-scale one region (factor 0.5-0.8): the interpolation trace of a pasted rescale."""
    out = center(ctx, margin).copy()
    y, x, h, w = _region(rng, out.shape[0], 0.4, 0.75)
    factor = float(rng.uniform(0.5, 0.8))
    patch = out[y : y + h, x : x + w]
    small = _resize(patch, (max(2, round(w * factor)), max(2, round(h * factor))), Image.BILINEAR)
    out[y : y + h, x : x + w] = _resize(small, (w, h), Image.BICUBIC)
    return out, {"factor": round(factor, 3), "region": [y, x, h, w]}


def splice(ctx: np.ndarray, margin: int, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, dict]:
    """Paste a region of another photograph, matched to the host's per-channel mean and spread.

    Matching keeps the tile's colour statistics (and greyness: grey hosts get grey donors), so the
    only evidence left is the boundary and the donor's different noise and texture.
    """
    out = center(ctx, margin).copy()
    y, x, h, w = _region(rng, out.shape[0], 0.3, 0.6)
    dy = int(rng.integers(0, donor.shape[0] - h + 1))
    dx = int(rng.integers(0, donor.shape[1] - w + 1))
    patch = donor[dy : dy + h, dx : dx + w].astype(np.float32)
    host = out[y : y + h, x : x + w]
    if np.allclose(host[..., 0], host[..., 1], atol=1) and np.allclose(host[..., 1], host[..., 2], atol=1):
        patch = np.repeat(patch.mean(axis=2, keepdims=True), 3, axis=2)
    mu_p, sd_p = patch.mean(axis=(0, 1)), patch.std(axis=(0, 1)) + 1e-3
    mu_h, sd_h = host.mean(axis=(0, 1)), host.std(axis=(0, 1)) + 1e-3
    feather = int(rng.integers(0, 3))  # 0-2 px soft edge, as a careful forger would blend
    yy, xx = np.mgrid[0:h, 0:w]
    edge = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
    alpha = np.clip((edge + 1) / (feather + 1), 0.0, 1.0)[..., None]
    matched = (patch - mu_p) / sd_p * sd_h + mu_h
    out[y : y + h, x : x + w] = alpha * matched + (1 - alpha) * host
    return out, {"region": [y, x, h, w], "feather": feather}


def double_jpeg(ctx: np.ndarray, margin: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """An earlier JPEG (quality 60-90) on a grid shifted against the final one: a re-saved image."""
    tile = ctx.shape[0] - 2 * margin
    dy, dx = (int(v) for v in rng.integers(0, min(8, margin + 1), size=2))
    q1 = int(rng.integers(60, 91))
    big = ctx[margin - dy : margin - dy + tile + 8, margin - dx : margin - dx + tile + 8]
    once = jpeg_roundtrip(big, q1)
    return once[dy : dy + tile, dx : dx + tile], {"q1": q1, "shift": [dy, dx]}


def upsample_artifacts(ctx: np.ndarray, margin: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A region regenerated from half resolution with a faint zero-mean checkerboard (transposed conv)."""
    out = center(ctx, margin).copy()
    y, x, h, w = _region(rng, out.shape[0], 0.5, 1.0)
    h, w = h - h % 2, w - w % 2
    patch = out[y : y + h, x : x + w]
    small = _resize(patch, (w // 2, h // 2), Image.BOX)
    up = _resize(small, (w, h), Image.NEAREST if rng.random() < 0.5 else Image.BILINEAR)
    amp = float(rng.uniform(1.5, 4.0))
    yy, xx = np.mgrid[0:h, 0:w]
    checker = np.where((yy + xx) % 2 == 0, amp, -amp)[..., None]
    out[y : y + h, x : x + w] = up + checker
    return out, {"amplitude": round(amp, 2), "region": [y, x, h, w]}


def manipulate(
    kind: str, ctx: np.ndarray, margin: int, rng: np.random.Generator, donor: np.ndarray | None = None
) -> tuple[np.ndarray, dict]:
    """Apply manipulation ``kind`` (one of KINDS) to a context crop; returns (tile, params)."""
    if kind == "resample":
        return resample_region(ctx, margin, rng)
    if kind == "splice":
        if donor is None:
            raise ValueError("splice needs a donor photograph")
        return splice(ctx, margin, rng, donor)
    if kind == "double_jpeg":
        return double_jpeg(ctx, margin, rng)
    if kind == "upsample":
        return upsample_artifacts(ctx, margin, rng)
    raise ValueError(f"unknown manipulation {kind!r}; choose one of {KINDS}")
