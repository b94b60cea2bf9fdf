"""Image transforms: JPEG decode + resize per sample in uint8, then one fused augmentation per batch.

Why fused and batched: at 32-64 px a torchvision/kornia chain applied per sample costs ~1.6 ms per
image (RandomAffine 0.3 ms, ColorJitter with hue 0.6 ms, kornia RandomMotionBlur 0.7 ms) against a
~60 us JPEG decode, so it, not the decode, would bound the loader. Here flips, rotation, translate,
scale and the optional random-resized crop are folded into ONE affine matrix per sample and applied
with a single ``grid_sample`` over the whole batch; kornia's batched ``motion_blur`` blurs the
selected samples; ColorJitter is one 3x3 colour matrix plus a contrast blend per sample (hue is the
linear YIQ hue rotation, the cheap equivalent of an HSV hue shift). Everything works on 0-255 floats,
so ``normalize='none'`` is simply "skip the last step".
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import kornia  # imported here, not lazily: forked DataLoader workers inherit it instead of re-importing
import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from distrib.config import AugmentConfig, ConfigError, DataConfig
from distrib.data.images import to_rgb8
from distrib.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = torch.tensor([0.299, 0.587, 0.114])
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
# data.highpass: per-channel 3x3 Laplacian. Random-init CNNs on the demo tiles stay at chance for 850+
# steps on raw pixels (content swamps the faint manipulation traces) but learn within ~150 on this residual.
_LAPLACIAN = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)


def decode_image(data: bytes, min_size: int = 0) -> np.ndarray:
    """Decode image bytes to an RGB uint8 HWC array: simplejpeg (DCT-downscaled toward ``min_size``), else Pillow."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_size, min_width=min_size)
    except Exception:  # not a JPEG (PNG, ...) or a recoverable JPEG error: let Pillow try
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            return to_rgb8(im)  # 16-bit, float, CMYK, palette and alpha by data.images' rules
    except Exception as e:
        raise DataError(
            f"cannot decode image ({len(data)} bytes): {e}; re-encode it as JPEG/PNG and re-run 'distrib shard'"
        ) from e


def resolve_mean_std(data_cfg: DataConfig, model=None) -> tuple[tuple, tuple] | None:
    """Mean/std (0-1 scale) for ``data.normalize``: imagenet, the timm model's pretrained_cfg, or None ('none')."""
    mode = data_cfg.normalize
    if mode == "none":
        return None
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if model is None:
        raise ConfigError(
            "data.normalize='model' needs the model (or its timm name / pretrained_cfg) to read "
            "mean/std from; pass it to resolve_mean_std or use data.normalize=imagenet"
        )
    import timm

    if isinstance(model, str):
        cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(model).to_dict())
    elif isinstance(model, dict):
        cfg = timm.data.resolve_data_config(pretrained_cfg=model)
    else:  # nn.Module: timm models carry pretrained_cfg; others fall back to timm's (imagenet) defaults
        cfg = timm.data.resolve_data_config(model=model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def _as_hwc_uint8(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise DataError(f"transform expects a uint8 image, got dtype {arr.dtype}; decode with decode_image()")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"transform expects an HxWx3 image, got shape {arr.shape}")
    return arr


class ImageTransform:
    """``prepare`` (per sample, uint8) + ``batch`` (fused augmentation, float); calling it does both for one image.

    The loader calls ``prepare`` in its workers for each decoded image, stacks a batch, and calls
    ``batch`` with the stream's own ``torch.Generator`` so augmentation is reproducible for a seed.
    """

    def __init__(
        self,
        size: int,
        train: bool,
        augment: AugmentConfig | None = None,
        mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
        highpass: bool = False,
    ):
        self.size = int(size)
        self.train = bool(train)
        self.highpass = bool(highpass)
        self.aug = augment if augment is not None else AugmentConfig()
        if mean_std is None:
            self.mean = self.std = None
        else:
            self.mean = torch.tensor(mean_std[0], dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            self.std = torch.tensor(mean_std[1], dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def __repr__(self) -> str:
        norm = ("none" if self.mean is None else "mean/std") + (" + highpass" if self.highpass else "")
        return f"ImageTransform(size={self.size}, train={self.train}, normalize={norm})"

    # ---- per sample (decode side) ----
    def prepare(self, img) -> torch.Tensor:
        """Resize the shorter side to ``size`` and centre-crop: uint8 HWC (numpy/PIL) -> uint8 [3, size, size]."""
        arr = self.resized(img)
        if not arr.flags.writeable:  # torch.from_numpy wants a writable array (Pillow's are read-only)
            arr = arr.copy()
        return torch.from_numpy(arr).permute(2, 0, 1)  # a CHW view: the batch's torch.stack makes the one copy

    def resized(self, img) -> np.ndarray:
        """``prepare``'s pixels as an HWC uint8 array (maybe a read-only view); the ring loader copies it to its slot."""
        arr = _as_hwc_uint8(img)
        h, w = arr.shape[:2]
        s = self.size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            if (nh, nw) != (h, w):
                arr = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BILINEAR))
            top, left = (nh - s) // 2, (nw - s) // 2
            arr = arr[top : top + s, left : left + s]
        return arr

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.batch(self.prepare(img)[None], generator)[0]

    # ---- per batch (float side) ----
    def batch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [B,3,S,S] -> float [B,3,S,S] on ``x``'s device: augmentation (train only), then normalization.

        The random parameters are drawn from ``generator`` (a CPU generator: a few numbers per sample) and
        moved to ``x.device``, so the same seed gives the same augmentation on CPU and on an accelerator,
        and nothing here waits on the device (augment.device=model runs it inside the training step).
        """
        out = x.float()
        dev = out.device
        if self.train and out.shape[0] > 0:
            out = self._geometric(out, generator)
            out = self._motion_blur(out, generator)
            out = self._color_jitter(out, generator)
        if self.mean is not None:
            out = (out - self.mean.to(dev)) / self.std.to(dev)
        if self.highpass:
            out = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="reflect"), _LAPLACIAN.to(dev), groups=3)
        return out.contiguous()

    def _uniform(self, n: int, lo: float, hi: float, g) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    def _geometric(self, x: torch.Tensor, g) -> torch.Tensor:
        a, n = self.aug, x.shape[0]
        if not (
            a.hflip
            or a.vflip
            or a.rotate
            or a.translate
            or a.scale_min != 1.0
            or a.scale_max != 1.0
            or a.random_resized_crop
        ):
            return x
        fx = torch.where(torch.rand(n, generator=g) < a.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(n, generator=g) < a.vflip, -1.0, 1.0)
        ang = self._uniform(n, -a.rotate, a.rotate, g) * (math.pi / 180.0)
        scale = self._uniform(n, a.scale_min, a.scale_max, g)
        # translate is a fraction of the size; normalized coordinates span 2 units
        tx, ty = (self._uniform(n, -2 * a.translate, 2 * a.translate, g) for _ in range(2))
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        # forward map p_out = scale * R * Flip * p_in + t, so sample p_in = Flip * R^T * (p_out - t) / scale
        m00, m01, m10, m11 = fx * cos, fx * sin, -fy * sin, fy * cos
        b0, b1 = -(m00 * tx + m01 * ty), -(m10 * tx + m11 * ty)
        if a.random_resized_crop:  # crop area 0.8-1, aspect 3/4-4/3, then the affine above on the crop
            area = self._uniform(n, 0.8, 1.0, g)
            logr = self._uniform(n, math.log(3 / 4), math.log(4 / 3), g)
            cw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
            ch = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
            cx = self._uniform(n, -1.0, 1.0, g) * (1 - cw)
            cy = self._uniform(n, -1.0, 1.0, g) * (1 - ch)
            m00, m01, b0 = cw * m00, cw * m01, cw * b0 + cx
            m10, m11, b1 = ch * m10, ch * m11, ch * b1 + cy
        theta = torch.stack([torch.stack([m00, m01, b0], 1), torch.stack([m10, m11, b1], 1)], 1)
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _motion_blur(self, x: torch.Tensor, g) -> torch.Tensor:
        a, n = self.aug, x.shape[0]
        if a.motion_blur_p <= 0:
            return x
        on = torch.rand(n, generator=g) < a.motion_blur_p
        angle = self._uniform(n, -a.motion_blur_angle, a.motion_blur_angle, g)
        idx = on.nonzero().squeeze(1)  # chosen on the CPU: no device sync, and only those rows are blurred
        if idx.numel() == 0:
            return x
        dev_idx = idx.to(x.device)
        blurred = kornia.filters.motion_blur(
            x.index_select(0, dev_idx),
            a.motion_blur_kernel,
            angle[idx].to(x.device),
            torch.zeros(idx.numel(), device=x.device),
            border_type="reflect",
        )
        return x.index_copy(0, dev_idx, blurred)

    def _color_jitter(self, x: torch.Tensor, g) -> torch.Tensor:
        bri, con, sat, hue = self.aug.color_jitter
        if not (bri or con or sat or hue):
            return x
        n = x.shape[0]
        b = self._uniform(n, max(0.0, 1 - bri), 1 + bri, g)
        c = self._uniform(n, max(0.0, 1 - con), 1 + con, g)
        s = self._uniform(n, max(0.0, 1 - sat), 1 + sat, g)
        h = self._uniform(n, -hue, hue, g) * (2 * math.pi)
        eye = torch.eye(3).expand(n, 3, 3)
        sat_m = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * _GRAY.view(1, 1, 3).expand(n, 3, 3)
        rot = torch.zeros(n, 3, 3)
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = torch.cos(h), -torch.sin(h), torch.sin(h), torch.cos(h)
        hue_m = _YIQ2RGB @ rot @ _RGB2YIQ
        mat = (b.view(n, 1, 1) * (hue_m @ sat_m)).to(x.device)  # n 3x3 matrices built on the CPU, moved once
        y = torch.bmm(mat, x.reshape(n, 3, -1)).reshape(x.shape).clamp_(0, 255)
        # contrast: blend with the per-image mean grey level, as torchvision's adjust_contrast does
        mean = (y * _GRAY.to(x.device).view(1, 3, 1, 1)).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        return ((y - mean) * c.to(x.device).view(n, 1, 1, 1) + mean).clamp_(0, 255)


def augment_placement(augment_cfg: AugmentConfig, data_cfg: DataConfig, device) -> tuple[str, str]:
    """(augment_on, decode_on) for ``build_loader``: augment.device=auto means 'model' on CUDA, 'loader' elsewhere."""
    kind = torch.device(device).type
    place = augment_cfg.device if augment_cfg.device != "auto" else ("model" if kind == "cuda" else "loader")
    decode = data_cfg.decode_device
    if decode == "cuda" and (place != "model" or kind != "cuda"):
        raise ConfigError(
            f"data.decode_device=cuda needs the model on a CUDA device and augment.device=model or "
            f"auto (got device {kind}, augment.device={augment_cfg.device}); set "
            f"data.decode_device=cpu, or train on a GPU"
        )
    return place, decode


def decode_batch(blobs: Sequence[torch.Tensor], size: int, device) -> torch.Tensor:
    """JPEG bytes (1-D uint8 tensors) -> uint8 [B,3,size,size] on ``device``, as decode_image + ``prepare`` do.

    One batched ``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA), then per distinct input shape one
    antialiased bilinear resize of the shorter side to ``size`` and a centre crop.
    """
    import warnings

    dev = torch.device(device)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 flags its image codecs as moving to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            imgs = decode_jpeg(list(blobs), mode=ImageReadMode.RGB, device=dev)
    except RuntimeError as e:
        raise DataError(
            f"batched JPEG decode on {dev} failed ({e}); check the shards with 'distrib shard "
            f"inspect' or use data.decode_device=cpu"
        ) from e
    out = torch.empty(len(imgs), 3, size, size, dtype=torch.uint8, device=dev)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(imgs):
        by_shape.setdefault(tuple(im.shape[-2:]), []).append(i)
    for (h, w), idx in by_shape.items():
        x = torch.stack([imgs[i] for i in idx])
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            if (nh, nw) != (h, w):
                x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255).to(torch.uint8)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, :, top : top + size, left : left + size]
        out[torch.tensor(idx, device=dev)] = x
    return out


def build_transform(
    augment_cfg: AugmentConfig | None, data_cfg: DataConfig, train: bool, mean_std: tuple | None | str = "auto"
) -> ImageTransform:
    """The training (augmenting) or deterministic eval transform for ``data_cfg.img_size``.

    ``mean_std`` is the 0-1 scale (mean, std) from ``resolve_mean_std``; None means raw 0-255 floats;
    "auto" resolves ``data.normalize`` without a model (so 'model' mode must pass it explicitly).
    """
    if isinstance(mean_std, str):
        mean_std = resolve_mean_std(data_cfg)
    return ImageTransform(
        data_cfg.img_size,
        train=train,
        augment=augment_cfg if train else None,
        mean_std=mean_std,
        highpass=data_cfg.highpass,
    )
