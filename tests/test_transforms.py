"""Transform tests: decode paths, the three normalization modes, augmentation shapes/dtypes and determinism."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from distrib.config import AugmentConfig, ConfigError, DataConfig
from distrib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, decode_image, resolve_mean_std
from distrib.errors import DataError

FULL = AugmentConfig(
    hflip=0.5,
    vflip=0.5,
    rotate=180,
    translate=0.1,
    scale_min=0.9,
    scale_max=1.1,
    motion_blur_p=0.5,
    color_jitter=[0.3, 0.3, 0.2, 0.05],
    random_resized_crop=True,
)


def _img(h=40, w=48, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_decode_jpeg_png_and_garbage():
    img = _img()
    jpg = decode_image(simplejpeg.encode_jpeg(img, quality=95))
    assert jpg.shape == img.shape and jpg.dtype == np.uint8 and np.abs(jpg.astype(int) - img).mean() < 40
    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0]).save(buf, format="PNG")  # grayscale PNG: the Pillow fallback, made RGB
    png = decode_image(buf.getvalue())
    assert png.shape == img.shape and np.array_equal(png[:, :, 1], img[:, :, 0])
    with pytest.raises(DataError, match="cannot decode image.*re-run 'distrib shard'"):
        decode_image(b"\xff\xd8 truncated")


def test_normalization_modes():
    img = _img(32, 32)
    raw = torch.from_numpy(img).permute(2, 0, 1).float()
    none = build_transform(None, DataConfig(img_size=32, normalize="none"), train=False)(img)
    assert torch.equal(none, raw) and none.max() > 200  # raw 0-255 floats for the unnormalized experiment
    imnet = build_transform(None, DataConfig(img_size=32, normalize="imagenet"), train=False)(img)
    want = (raw / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(imnet, want, atol=1e-5)
    # 'model': the timm model's own pretrained_cfg (inception_v3 uses mean = std = 0.5)
    data = DataConfig(img_size=32, normalize="model")
    ms = resolve_mean_std(data, "inception_v3")
    assert ms == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model_out = build_transform(None, data, train=False, mean_std=ms)(img)
    assert torch.allclose(model_out, raw / 127.5 - 1.0, atol=1e-5)
    import timm

    module = timm.create_model("resnet18", pretrained=False, num_classes=1)
    assert resolve_mean_std(data, module) == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ConfigError, match="data.normalize='model' needs the model"):
        build_transform(None, data, train=False)


def test_train_transform_shapes_dtypes_and_reproducibility():
    data = DataConfig(img_size=32)
    train = build_transform(FULL, data, train=True)
    out = train(_img(40, 48))  # non-square input: shorter side resized, centre-cropped
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    batch = torch.stack([train.prepare(_img(seed=s)) for s in range(6)])
    assert batch.dtype == torch.uint8 and batch.shape == (6, 3, 32, 32)
    a = train.batch(batch, torch.Generator().manual_seed(1))
    b = train.batch(batch, torch.Generator().manual_seed(1))
    c = train.batch(batch, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    evaluate = build_transform(FULL, data, train=False)  # eval ignores augmentation: deterministic
    e1, e2 = evaluate.batch(batch), evaluate.batch(batch)
    assert torch.equal(e1, e2) and not torch.equal(a, e1)


def test_each_augmentation_does_what_it_says():
    data = DataConfig(img_size=32, normalize="none")
    x = torch.stack([torch.from_numpy(_img(32, 32, s)).permute(2, 0, 1) for s in range(4)])
    ident = build_transform(AugmentConfig(hflip=0.0), data, train=True).batch(x)
    assert torch.equal(ident, x.float())
    hflip = build_transform(AugmentConfig(hflip=1.0), data, train=True).batch(x)
    assert torch.allclose(hflip, x.float().flip(-1), atol=1e-2)
    vflip = build_transform(AugmentConfig(hflip=0.0, vflip=1.0), data, train=True).batch(x)
    assert torch.allclose(vflip, x.float().flip(-2), atol=1e-2)
    rotate = build_transform(AugmentConfig(hflip=0.0, rotate=180), data, train=True)
    rot = rotate.batch(x, torch.Generator().manual_seed(0))
    assert (rot == 0).float().mean() > 0.01  # rotated corners are zero-filled
    blur = build_transform(AugmentConfig(hflip=0.0, motion_blur_p=1.0), data, train=True).batch(x)
    # a motion blur keeps the mean but removes high-frequency energy
    assert torch.allclose(blur.mean(), x.float().mean(), rtol=0.02)
    assert blur.diff(dim=-1).abs().mean() < 0.8 * x.float().diff(dim=-1).abs().mean()
    jit = build_transform(AugmentConfig(hflip=0.0, color_jitter=[0.3, 0.3, 0.2, 0.05]), data, train=True)
    y = jit.batch(x, torch.Generator().manual_seed(3))
    assert y.min() >= 0 and y.max() <= 255 and not torch.equal(y, x.float())
    hue_only = build_transform(AugmentConfig(hflip=0.0, color_jitter=[0, 0, 0, 0.05]), data, train=True)
    gray = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)  # grey has no hue: unchanged
    assert torch.allclose(hue_only.batch(gray), gray.float(), atol=1e-3)


def test_highpass_is_laplacian_residual_in_train_and_eval():
    """data.highpass: flat images map to 0, a pixel checkerboard to +-8*amplitude/std; same in both modes."""
    data = DataConfig(img_size=16, normalize="imagenet", highpass=True)
    flat = np.full((16, 16, 3), 120, np.uint8)
    yy, xx = np.mgrid[0:16, 0:16]
    checker = np.where((yy + xx) % 2 == 0, 130, 110).astype(np.uint8)[..., None].repeat(3, axis=2)
    for train in (False, True):
        tf = build_transform(AugmentConfig(hflip=0.0), data, train=train)
        assert float(tf(flat).abs().max()) < 1e-4
        out = tf(checker)
        inner = out[:, 1:-1, 1:-1]
        expect = 8 * 10 / (255 * torch.tensor(IMAGENET_STD)).view(3, 1, 1)
        assert torch.allclose(inner.abs(), expect.expand_as(inner), rtol=1e-4)
    with pytest.raises(ConfigError):
        DataConfig(highpass="yes").validate()
