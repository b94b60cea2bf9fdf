"""One defined conversion from any Pillow image mode to 8-bit RGB (shard writer and decoder).

``Image.convert("RGB")`` clips 16-bit and float images to 0..255 (a mid-grey 16-bit PNG turns
white) and drops alpha without saying so. ``to_rgb8`` instead:

- 8-bit modes (``1``, ``L``, ``RGB``, ``YCbCr``, ``LAB``, ``HSV``): Pillow's own conversion.
- 16-bit (``I;16``, ``I;16B``, ``I;16L``, ...): scaled by the 16-bit range, ``round(v * 255 / 65535)``.
- 32-bit integer ``I``: values within 0..65535 are 16-bit data (how Pillow opens some 16-bit
  files) and scaled the same way; other ranges are stretched linearly from their min..max to 0..255.
- float ``F``: values within 0..1 are scaled by 255; other ranges are stretched min..max to 0..255.
- ``CMYK``: ``R = (255 - C) * (255 - K) / 255`` (likewise G from M, B from Y), no ICC profile.
- alpha (``LA``, ``RGBA``, ``PA``, ``RGBa``) and palette images with transparency: the colour is
  composited on black, ``RGB * A / 255`` (transparent pixels become black, whatever colour they hid).
- palette ``P`` without transparency: its palette colours.
"""

from __future__ import annotations

import numpy as np

_ALPHA = ("LA", "RGBA", "PA", "RGBa")


def _scale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _gray(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def to_rgb8(im) -> np.ndarray:
    """The image as an HxWx3 uint8 array, by the conversions in this module's docstring."""
    mode = im.mode
    if mode.startswith("I;16"):
        return _gray(_scale(np.asarray(im, dtype=np.float64), 0.0, 65535.0))
    if mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        top = 65535.0 if mode == "I" else 1.0
        if not np.isfinite([lo, hi]).all():
            a = np.nan_to_num(a, nan=0.0, posinf=top, neginf=0.0)
            lo, hi = float(a.min()), float(a.max())
        return _gray(_scale(a, 0.0, top) if 0 <= lo and hi <= top else _scale(a, lo, hi))
    if mode == "CMYK":
        c = 255.0 - np.asarray(im, dtype=np.float64)
        return np.rint(c[..., :3] * c[..., 3:4] / 255.0).astype(np.uint8)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in _ALPHA:
        a = np.asarray(im if mode == "RGBA" else im.convert("RGBA"), dtype=np.float64)
        return np.rint(a[..., :3] * a[..., 3:4] / 255.0).astype(np.uint8)
    if mode == "RGB":
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))
