"""Single-GPU fallback tests: real runs on one CUDA device (`pytest -m gpu`); skipped where CUDA is absent.

Each test trains or evaluates for real on the debug config / tiny sizes over the demo shards: mixed
precision, channels_last, torch.compile, resume, NCCL and DeepSpeed launches, the DINOv2 probe and the
GenConViT-VAE under AMP, a fractional-GPU Ray sweep, CUDA-vs-CPU embedding/cascade scores, and the loader
with augmentation (and JPEG decode) on the GPU.
"""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, subprocess_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with pytest -m gpu)"),
]

DEBUG = "launch/configs/experiments/debug.yaml"
SHORT = ["train.epochs=1", "train.latency_batches=1"]
ACCELERATE = [
    PYTHON,
    "-m",
    "accelerate.commands.launch",
    "--num_machines",
    "1",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]


def _run(cmd, tmp, timeout=900, env_extra=None):
    env = subprocess_env(tmp)
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def _train(out, shards, tmp, *extra, config=DEBUG, script=("launch/train.py",), launcher=()):
    proc = _run([*(launcher or [PYTHON]), *script, config, "--out", str(out), f"data.shards={shards}", *extra], tmp)
    return proc


def _results(out) -> dict:
    return json.loads((out / "evaluation_results.json").read_text())


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "extra,precision",
    [
        (["train.mixed_precision=bf16"], "bf16"),
        (["train.mixed_precision=fp16"], "fp16"),
        (["train.channels_last=true"], "no"),
        (["train.compile=true"], "no"),
    ],
    ids=["bf16", "fp16_scaler", "channels_last", "compile"],
)
def test_train_on_one_gpu(demo_shards, tmp_path, extra, precision):
    out = tmp_path / "run"
    proc = _train(out, demo_shards, tmp_path, *SHORT, "train.ckpt_every_steps=2", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = _results(out)
    assert res["device_type"] == "cuda" and res["mixed_precision"] == precision and res["world_size"] == 1
    assert np.isfinite(res["val_loss"]) and res["num_val_samples"] > 0
    state = torch.load(out / "last_checkpoint" / "state.pt", map_location="cpu", weights_only=True)
    if precision == "fp16":  # the grad scaler ran and was checkpointed with a live scale
        assert state["scaler"] and float(state["scaler"]["scale"]) > 0
    else:
        assert not state["scaler"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.timeout(2400)
def test_resume_on_gpu_continues_like_an_uninterrupted_run(demo_shards, tmp_path):
    """SIGKILL mid-epoch, --resume: weights within 1e-3 of the uninterrupted run (cuDNN kernels are not bitwise
    deterministic, so equality is stated as a tolerance), same log rows; augmentation on the GPU (auto)."""
    args = [
        "train.epochs=2",
        "train.ckpt_every_steps=3",
        "train.latency_batches=1",
        "augment.rotate=30",
        "augment.color_jitter=[0.2,0.2,0.2,0.02]",
    ]
    ref = _train(tmp_path / "ref", demo_shards, tmp_path, *args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = tmp_path / "crashed"
    killed = _train(
        crashed, demo_shards, tmp_path, *args, script=("tests/scripts/train_crash.py", "5"), launcher=[PYTHON]
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _train(crashed, demo_shards, tmp_path, *args, "--resume")
    assert resumed.returncode == 0 and "resumed at epoch 1" in resumed.stdout, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "ref" / "last_checkpoint" / "state.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(crashed / "last_checkpoint" / "state.pt", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-3, rtol=1e-3), k
        else:
            assert torch.equal(a[k], b[k]), k
    assert _results(tmp_path / "ref")["metrics_at_0.5"]["n"] == _results(crashed)["metrics_at_0.5"]["n"]


@pytest.mark.timeout(1200)
def test_accelerate_launch_one_process_nccl(demo_shards, tmp_path):
    out = tmp_path / "run"
    launcher = [*ACCELERATE, "--multi_gpu", "--num_processes", "1", "--mixed_precision", "bf16"]
    proc = _train(out, demo_shards, tmp_path, *SHORT, "dist.backend=nccl", launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = _results(out)
    assert res["backend"] == "nccl" and res["device_type"] == "cuda" and res["world_size"] == 1


@pytest.mark.timeout(1500)
def test_deepspeed_zero2_on_one_gpu(demo_shards, tmp_path):
    out = tmp_path / "run"
    launcher = [*ACCELERATE, "--config_file", "launch/deepspeed_zero2.yaml", "--num_processes", "1"]
    proc = _train(
        out, demo_shards, tmp_path, *SHORT, "train.ckpt_every_steps=2", "model.name=resnet10t", launcher=launcher
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = _results(out)
    assert res["distributed_type"] == "DEEPSPEED" and res["device_type"] == "cuda" and res["backend"] == "nccl"
    assert (out / "last_checkpoint" / "deepspeed").is_dir()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "config,extra",
    [
        ("launch/configs/experiments/pit_exp006_dinov2_probe.yaml", []),  # random init: no weights download
        ("launch/configs/experiments/deepfake_expert_genconvit_vae.yaml", []),
    ],
    ids=["dinov2_probe", "genconvit_vae"],
)
def test_plan_models_take_a_few_amp_steps(demo_shards, tmp_path, config, extra):
    """At their plan image sizes (126 px probe, 224 px GenConViT), bf16 autocast, 4 optimizer steps."""
    out = tmp_path / "run"
    proc = _train(
        out,
        demo_shards,
        tmp_path,
        "train.max_steps=4",
        "train.epochs=1",
        "train.latency_batches=1",
        "data.batch_size=8",
        "data.num_workers=2",
        "train.mixed_precision=bf16",
        *extra,
        config=config,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = _results(out)
    assert res["device_type"] == "cuda" and res["mixed_precision"] == "bf16" and np.isfinite(res["val_loss"])


@pytest.mark.timeout(1800)
def test_ray_sweep_two_trials_share_the_gpu(demo_shards, tmp_path):
    """tune.gpus_per_trial=0.5: two trials hold the one GPU at the same time (overlapping wall-clock)."""
    from distrib.config import load_config
    from distrib.sweep.driver import run_sweep

    cfg = load_config(
        REPO / DEBUG,
        [
            f"data.shards={demo_shards}",
            "train.epochs=2",
            "data.samples_per_epoch=256",
            "train.latency_batches=1",
            "tune.embed_best=false",
            "tune.gpus_per_trial=0.5",
            "tune.cpus_per_trial=1",
        ],
    )
    out = tmp_path / "sweep"
    run_sweep(cfg, {"optim.lr": [1e-3]}, out, num_cpus=4)
    spans = []
    for events in sorted((out / "trials").glob("*/trial_events.log")):
        rows = [line.split() for line in events.read_text().splitlines()]
        start = min(float(t) for t, _, e in rows if e == "start")
        done = max(float(t) for t, _, e in rows if e == "done")
        spans.append((start, done))
        res = _results(events.parent)
        assert res["device_type"] == "cuda", events.parent
    assert len(spans) == 3  # one config x 3 folds
    overlaps = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if a[0] < b[1] and b[0] < a[1]]
    assert overlaps, spans


@pytest.fixture(scope="module")
def cpu_fold_runs(demo_shards, tmp_path_factory):
    """Three debug fold runs trained on CPU (ACCELERATE_USE_CPU), plus their OOF alignment."""
    root = tmp_path_factory.mktemp("gpu_folds")
    runs = []
    for k in range(3):
        out = root / f"fold{k}"
        proc = _run(
            [
                PYTHON,
                "launch/train.py",
                DEBUG,
                "--out",
                str(out),
                f"data.shards={demo_shards}",
                f"data.fold={k}",
                "data.samples_per_epoch=64",
                *SHORT,
            ],
            root,
            env_extra={"ACCELERATE_USE_CPU": "true"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(str(out))
    from distrib.config import load_config
    from distrib.stacking.embed import alignment_path, extract_oof

    cfg = load_config(REPO / DEBUG, ["embed.dim=8", "embed.anchors=24", "embed.fit_samples=64", "embed.batch_size=16"])
    parquet = root / "oof.parquet"
    extract_oof(runs, parquet, cfg.embed)
    return runs, alignment_path(parquet)


def _val_images(shards, size):
    from distrib.config import DataConfig
    from distrib.data.loader import build_loader
    from distrib.data.transforms import build_transform

    tf = build_transform(None, DataConfig(img_size=size), train=False)
    batch = next(iter(build_loader(shards, "val", None, 0, 1, 0, 32, 0, tf, 0, mode="eval")))
    return batch["image"]


@pytest.mark.timeout(1800)
def test_embedding_and_cascade_scores_on_cuda_equal_cpu(cpu_fold_runs, demo_shards):
    from distrib.cascade.run import MultiSizeTransform, Stage
    from distrib.stacking.embed import AlignedExpert

    runs, align = cpu_fold_runs
    images = _val_images(demo_shards, 32)
    cpu = AlignedExpert(runs, align, device="cpu")(images)
    gpu = AlignedExpert(runs, align, device="cuda")(images)
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-3, rtol=1e-3)  # aligned embeddings
    np.testing.assert_allclose(gpu[1], cpu[1], atol=1e-3)  # P(fake)
    multi = MultiSizeTransform([32])
    from distrib.data.loader import build_loader

    flat = next(iter(build_loader(demo_shards, "val", None, 0, 1, 0, 32, 0, multi, 0, mode="eval")))["image"]
    p_cpu = Stage(runs[0], torch.device("cpu"))(multi, flat)
    p_gpu = Stage(runs[0], torch.device("cuda"))(multi, flat)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=1e-3)  # the stage normalizes on its device (uint8 moved first)


@pytest.mark.timeout(900)
def test_loader_with_augmentation_and_jpeg_decode_on_the_gpu(demo_shards):
    """augment.device=model and decode_device=cuda: the GPU batch matches the CPU pipeline's (same draws)."""
    from distrib.config import AugmentConfig, DataConfig
    from distrib.data.loader import build_loader
    from distrib.data.transforms import build_transform

    aug = AugmentConfig(hflip=0.5, rotate=30, color_jitter=[0.2, 0.2, 0.2, 0.02], motion_blur_p=0.5)
    tf = build_transform(aug, DataConfig(img_size=64), train=True)
    kw = dict(mode="train", shuffle_buffer=64, augment_on="model", samples_per_epoch=96)
    on_gpu = build_loader(demo_shards, "train", [1, 2], 0, 1, 2, 32, 0, tf, 0, decode_on="cuda", pin_memory=True, **kw)
    on_cpu = build_loader(demo_shards, "train", [1, 2], 0, 1, 2, 32, 0, tf, 0, **kw)
    cuda = torch.device("cuda")
    for g, c in zip(on_gpu, on_cpu):
        assert isinstance(g["image"], list) and g["key"] == c["key"]
        x = on_gpu.to_device(g, cuda)
        y = on_cpu.to_device(c, cuda)  # CPU decode, GPU augmentation
        z = on_cpu.to_device(c, torch.device("cpu"))  # all on the CPU
        assert x.device.type == "cuda" and x.shape == y.shape == (32, 3, 64, 64)
        assert torch.allclose(y.cpu(), z, atol=1e-3)  # same augmentation draws on both devices
        assert (x - y).abs().mean() < 0.05  # nvjpeg + torch resize vs libjpeg-turbo + PIL: a few grey levels


@pytest.mark.timeout(1200)
def test_train_with_decode_on_gpu(demo_shards, tmp_path):
    out = tmp_path / "run"
    proc = _train(
        out,
        demo_shards,
        tmp_path,
        *SHORT,
        "data.decode_device=cuda",
        "augment.device=model",
        "data.num_workers=2",
        "train.mixed_precision=bf16",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _results(out)["device_type"] == "cuda"


@pytest.mark.timeout(1200)
def test_predict_on_cuda_equals_cpu(cpu_fold_runs, demo_shards, tmp_path):
    """`distrib predict --device cuda` on a CPU-trained run: the same rows and P(fake) within 1e-3 of --device cpu."""
    import pandas as pd

    from distrib.inference.predict import predict

    runs, _ = cpu_fold_runs
    cpu = predict(runs[0], demo_shards, tmp_path / "cpu.csv", device="cpu", split="val")
    gpu = predict(runs[0], demo_shards, tmp_path / "gpu.csv", device="cuda", split="val")
    assert cpu["n"] == gpu["n"] > 0
    merged = pd.read_csv(tmp_path / "cpu.csv").merge(pd.read_csv(tmp_path / "gpu.csv"), on="path")
    assert len(merged) == cpu["n"]
    np.testing.assert_allclose(merged["prob_y"], merged["prob_x"], atol=1e-3)
