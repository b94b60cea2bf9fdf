"""The config schema: one dataclass per concern (data, augment, model, optim, train, dist, tune);
the later stages' sections are in ``downstream.py``, the shared machinery in ``fields.py``.

Every field carries its one-line meaning as ``field(metadata={"doc": ...})``, the one source that
the config reference page (docs/reference/config.md) reads; every dataclass validates itself in ``__post_init__`` so a bad
value fails before any process group, Ray cluster or output file is created.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distrib.config.downstream import EmbedConfig, ExportConfig, StackConfig, ThresholdConfig
from distrib.config.fields import Section, check_choice, check_value
from distrib.errors import ConfigError

SEARCHES = ("grid", "random", "optuna")  # tune.search modes (sweep/search.py)


@dataclass
class DataConfig(Section):
    _prefix = "data"
    shards: str = field(
        default="",
        metadata={"doc": "shard directory or URL holding index.json (local path, http(s)://, pipe:, s3://, gs://)"},
    )
    fold: int = field(
        default=0,
        metadata={"doc": "held-out validation fold; -1 trains on every fold and validates on the 'val' split"},
    )
    img_size: int = field(default=64, metadata={"doc": "square input size fed to the model, in pixels"})
    batch_size: int = field(default=32, metadata={"doc": "per-process micro-batch size"})
    eval_batch_size: int = field(default=0, metadata={"doc": "per-process evaluation batch size; 0 means batch_size"})
    num_workers: int = field(default=0, metadata={"doc": "DataLoader worker processes per rank"})
    normalize: str = field(
        default="imagenet",
        metadata={"doc": "'imagenet' mean/std, 'model' (timm pretrained_cfg) or 'none' (raw 0-255 floats)"},
    )
    highpass: bool = field(
        default=False,
        metadata={"doc": "feed the model a 3x3 Laplacian residual of the normalized image (forensic input)"},
    )
    samples_per_epoch: int = field(
        default=0, metadata={"doc": "training samples per epoch across all ranks; 0 = the training folds' size"}
    )
    shuffle_buffer: int = field(default=1000, metadata={"doc": "WebDataset shuffle buffer, in samples"})
    seed: int = field(default=0, metadata={"doc": "data-order seed; the shuffle depends on (seed, epoch)"})
    classes: dict = field(
        default_factory=dict,
        metadata={"doc": "{negative: NAME, positive: NAME}: must match the index's mapping; {} = no check"},
    )
    verify: str = field(
        default="auto",
        metadata={
            "doc": "shard check before training: full (sha256), size (size + tar header), auto (full up to 1 GiB)"
        },
    )
    decode_device: str = field(
        default="cpu",
        metadata={
            "doc": "JPEG decode: cpu (loader workers) or cuda (batched nvjpeg in the step; augment on the model's device)"
        },
    )

    def validate(self) -> None:
        check_choice("data.decode_device", self.decode_device, ("cpu", "cuda"))
        check_choice("data.verify", self.verify, ("auto", "full", "size"))
        check_value(
            not self.classes
            or (
                set(self.classes) == {"negative", "positive"}
                and all(isinstance(v, str) and v.strip() for v in self.classes.values())
                and self.classes["negative"].strip().casefold() != self.classes["positive"].strip().casefold()
            ),
            "data.classes",
            self.classes,
            "{negative: NAME, positive: NAME} with two different names, or {}",
        )
        check_value(self.fold >= -1, "data.fold", self.fold, "-1 or a fold index >= 0")
        check_value(16 <= self.img_size <= 1024, "data.img_size", self.img_size, "16..1024")
        check_value(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
        check_value(self.eval_batch_size >= 0, "data.eval_batch_size", self.eval_batch_size, ">= 0")
        check_value(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        check_choice("data.normalize", self.normalize, ("imagenet", "model", "none"))
        check_value(isinstance(self.highpass, bool), "data.highpass", self.highpass, "true or false")
        check_value(self.samples_per_epoch >= 0, "data.samples_per_epoch", self.samples_per_epoch, ">= 0")
        check_value(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, ">= 0")


@dataclass
class AugmentConfig(Section):
    _prefix = "augment"
    hflip: float = field(default=0.5, metadata={"doc": "probability of a horizontal flip"})
    vflip: float = field(default=0.0, metadata={"doc": "probability of a vertical flip"})
    rotate: float = field(default=0.0, metadata={"doc": "maximum rotation in degrees (uniform in +-rotate)"})
    translate: float = field(default=0.0, metadata={"doc": "maximum affine translation as a fraction of the size"})
    scale_min: float = field(default=1.0, metadata={"doc": "lower bound of the affine scale"})
    scale_max: float = field(default=1.0, metadata={"doc": "upper bound of the affine scale"})
    motion_blur_p: float = field(default=0.0, metadata={"doc": "probability of kornia motion blur"})
    motion_blur_kernel: int = field(default=5, metadata={"doc": "motion-blur kernel size (odd)"})
    motion_blur_angle: float = field(default=90.0, metadata={"doc": "motion-blur angle range in degrees (+-)"})
    color_jitter: list[float] = field(
        default_factory=lambda: [0.0, 0.0, 0.0, 0.0], metadata={"doc": "brightness, contrast, saturation, hue"}
    )
    random_resized_crop: bool = field(
        default=False, metadata={"doc": "RandomResizedCrop(scale 0.8-1) instead of a plain resize"}
    )
    device: str = field(
        default="auto",
        metadata={
            "doc": "where batch augmentation + normalization run: loader (workers), model (in the step, on the model's device) or auto (model on CUDA, else loader)"
        },
    )

    def validate(self) -> None:
        check_choice("augment.device", self.device, ("auto", "loader", "model"))
        for name in ("hflip", "vflip", "motion_blur_p"):
            v = getattr(self, name)
            check_value(0.0 <= v <= 1.0, f"augment.{name}", v, "a probability in 0..1")
        check_value(0.0 <= self.rotate <= 180.0, "augment.rotate", self.rotate, "0..180 degrees")
        check_value(0.0 <= self.translate <= 0.5, "augment.translate", self.translate, "0..0.5")
        check_value(
            0.1 <= self.scale_min <= self.scale_max <= 4.0,
            "augment.scale_min/scale_max",
            (self.scale_min, self.scale_max),
            "0.1 <= scale_min <= scale_max <= 4",
        )
        check_value(
            self.motion_blur_kernel >= 3 and self.motion_blur_kernel % 2 == 1,
            "augment.motion_blur_kernel",
            self.motion_blur_kernel,
            "an odd integer >= 3",
        )
        check_value(
            0.0 <= self.motion_blur_angle <= 180.0, "augment.motion_blur_angle", self.motion_blur_angle, "0..180"
        )
        check_value(
            len(self.color_jitter) == 4 and all(v >= 0 for v in self.color_jitter) and self.color_jitter[3] <= 0.5,
            "augment.color_jitter",
            self.color_jitter,
            "[brightness, contrast, saturation, hue], all >= 0, hue <= 0.5",
        )


@dataclass
class ModelConfig(Section):
    _prefix = "model"
    name: str = field(
        default="resnet18", metadata={"doc": "registered distrib model (e.g. 'genconvit_ed') or any timm model name"}
    )
    num_classes: int = field(
        default=1, metadata={"doc": "1 = a single logit with BCE, 2 = two logits with cross-entropy"}
    )
    pretrained_file: str = field(
        default="", metadata={"doc": "local weights file loaded via timm pretrained_cfg_overlay; '' = random init"}
    )
    pretrained: bool = field(
        default=False,
        metadata={
            "doc": "timm's own weights for model.name from the Hugging Face hub cache (HF_HOME); pretrained_file wins"
        },
    )
    freeze_backbone: bool = field(
        default=False, metadata={"doc": "linear probe: freeze everything but the classifier head"}
    )
    drop_rate: float = field(default=0.0, metadata={"doc": "dropout before the classifier"})
    img_size: int = field(default=0, metadata={"doc": "passed to timm as img_size for ViT/Swin models; 0 = not passed"})
    kwargs: dict = field(default_factory=dict, metadata={"doc": "extra keyword arguments for the model constructor"})

    def validate(self) -> None:
        check_value(bool(self.name), "model.name", self.name, "a registered or timm model name")
        check_choice("model.num_classes", self.num_classes, (1, 2))
        check_value(0.0 <= self.drop_rate < 1.0, "model.drop_rate", self.drop_rate, "0..1")
        check_value(self.img_size >= 0, "model.img_size", self.img_size, ">= 0")


@dataclass
class OptimConfig(Section):
    _prefix = "optim"
    name: str = field(default="adamw", metadata={"doc": "adamw, adam or sgd"})
    lr: float = field(default=1e-3, metadata={"doc": "peak learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"doc": "decoupled (AdamW) or L2 (Adam/SGD) weight decay"})
    momentum: float = field(default=0.9, metadata={"doc": "SGD momentum"})
    scheduler: str = field(default="cosine", metadata={"doc": "cosine, step or none (applied per optimizer step)"})
    step_size: int = field(default=10, metadata={"doc": "StepLR period in epochs"})
    gamma: float = field(default=0.1, metadata={"doc": "StepLR decay factor"})
    warmup_steps: int = field(default=0, metadata={"doc": "linear warmup optimizer steps"})
    min_lr: float = field(default=0.0, metadata={"doc": "cosine floor"})
    grad_clip: float = field(default=0.0, metadata={"doc": "max gradient norm; 0 disables clipping"})

    def validate(self) -> None:
        check_choice("optim.name", self.name, ("adamw", "adam", "sgd"))
        check_value(0.0 < self.lr < 10.0, "optim.lr", self.lr, "0 < lr < 10")
        check_value(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        check_value(0.0 <= self.momentum < 1.0, "optim.momentum", self.momentum, "0..1")
        check_choice("optim.scheduler", self.scheduler, ("cosine", "step", "none"))
        check_value(self.step_size >= 1, "optim.step_size", self.step_size, ">= 1")
        check_value(0.0 < self.gamma <= 1.0, "optim.gamma", self.gamma, "0 < gamma <= 1")
        check_value(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        check_value(self.min_lr >= 0, "optim.min_lr", self.min_lr, ">= 0")
        check_value(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0")


@dataclass
class TrainConfig(Section):
    _prefix = "train"
    epochs: int = field(default=1, metadata={"doc": "passes over samples_per_epoch"})
    max_steps: int = field(default=0, metadata={"doc": "stop after this many optimizer steps in total; 0 = no limit"})
    grad_accum: int = field(default=1, metadata={"doc": "micro-batches per optimizer step"})
    label_smoothing: float = field(default=0.0, metadata={"doc": "label smoothing for BCE/CE targets"})
    cls_weight: float = field(default=1.0, metadata={"doc": "weight of the classification loss (GenConViT seed: 0.9)"})
    recon_weight: float = field(default=0.0, metadata={"doc": "weight of the reconstruction MSE (GenConViT seed: 0.1)"})
    kl_weight: float = field(default=0.0, metadata={"doc": "weight of the VAE KL term (GenConViT-VAE seed: 0.01)"})
    mixed_precision: str = field(default="no", metadata={"doc": "no, bf16 or fp16 (bf16 with BatchNorm fails on CPU)"})
    channels_last: bool = field(default=False, metadata={"doc": "NHWC memory format for convnets on GPU"})
    compile: bool = field(default=False, metadata={"doc": "torch.compile the model"})
    seed: int = field(default=0, metadata={"doc": "global seed: a fixed seed reproduces a CPU run"})
    ckpt_every_steps: int = field(
        default=0, metadata={"doc": "also checkpoint every N optimizer steps; 0 = only at epoch end"}
    )
    log_every_steps: int = field(default=10, metadata={"doc": "TensorBoard / progress-bar logging period"})
    eval_every_epochs: int = field(default=1, metadata={"doc": "validate every N epochs (and always after the last)"})
    distill_teacher: str = field(
        default="", metadata={"doc": "run dir of a trained teacher for knowledge distillation; '' = off"}
    )
    distill_alpha: float = field(default=0.5, metadata={"doc": "weight of the KD term: alpha*KD(T) + (1-alpha)*CE"})
    distill_temperature: float = field(default=2.0, metadata={"doc": "KD softmax/sigmoid temperature"})
    latency_batches: int = field(
        default=20, metadata={"doc": "batch-1 forward passes timed for evaluation_results.json"}
    )
    max_skipped_fraction: float = field(
        default=0.01, metadata={"doc": "a run whose loader skipped more corrupt samples (train or val) fails"}
    )
    trackers: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"doc": "tensorboard + any accelerate log_with name"}
    )

    def validate(self) -> None:
        check_value(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        check_value(self.max_steps >= 0, "train.max_steps", self.max_steps, ">= 0")
        check_value(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, ">= 1")
        check_value(0.0 <= self.label_smoothing < 0.5, "train.label_smoothing", self.label_smoothing, "0 <= x < 0.5")
        for name in ("cls_weight", "recon_weight", "kl_weight"):
            check_value(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        check_value(self.ckpt_every_steps >= 0, "train.ckpt_every_steps", self.ckpt_every_steps, ">= 0")
        check_value(self.log_every_steps >= 1, "train.log_every_steps", self.log_every_steps, ">= 1")
        check_value(self.eval_every_epochs >= 1, "train.eval_every_epochs", self.eval_every_epochs, ">= 1")
        check_value(0.0 <= self.distill_alpha <= 1.0, "train.distill_alpha", self.distill_alpha, "0..1")
        check_value(self.distill_temperature > 0, "train.distill_temperature", self.distill_temperature, "> 0")
        check_value(self.latency_batches >= 0, "train.latency_batches", self.latency_batches, ">= 0")
        check_value(
            0.0 <= self.max_skipped_fraction <= 1.0, "train.max_skipped_fraction", self.max_skipped_fraction, "0..1"
        )
        for name in self.trackers:  # tensorboard + accelerate's LoggerType names
            check_choice(
                "train.trackers", name, ("tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive")
            )


@dataclass
class EvalConfig(Section):
    _prefix = "eval"
    group_agg: str = field(
        default="none",
        metadata={"doc": "group-level AUC/EER/AP from each group's sample probabilities: none, mean or max"},
    )

    def validate(self) -> None:
        check_choice("eval.group_agg", self.group_agg, ("none", "mean", "max"))


@dataclass
class DistConfig(Section):
    _prefix = "dist"
    backend: str = field(
        default="auto", metadata={"doc": "process-group backend: auto (nccl on GPU, gloo on CPU), gloo or nccl"}
    )
    timeout_s: int = field(default=300, metadata={"doc": "collective timeout; a hang fails after this many seconds"})

    def validate(self) -> None:
        check_choice("dist.backend", self.backend, ("auto", "gloo", "nccl"))
        check_value(self.timeout_s >= 10, "dist.timeout_s", self.timeout_s, ">= 10")


@dataclass
class TuneConfig(Section):
    _prefix = "tune"
    folds: int = field(default=5, metadata={"doc": "number of CV folds swept as a search-space axis"})
    grid: dict = field(default_factory=dict, metadata={"doc": "dotted override -> list of values (cross product)"})
    cpus_per_trial: float = field(default=1.0, metadata={"doc": "Ray CPUs per trial"})
    gpus_per_trial: float = field(default=0.0, metadata={"doc": "Ray GPUs per trial; fractions share one GPU"})
    workers_per_trial: int = field(
        default=1, metadata={"doc": "> 1 runs each trial as a Ray Train TorchTrainer with DDP inside"}
    )
    max_concurrent: int = field(default=0, metadata={"doc": "parallel trials; 0 = as many as resources allow"})
    max_failures: int = field(default=1, metadata={"doc": "retries of a failed trial from its last checkpoint"})
    asha: bool = field(
        default=False,
        metadata={"doc": "grid mode: per-trial (one fold) ASHA over epochs (biases fold comparisons; off by default)"},
    )
    search: str = field(
        default="grid",
        metadata={"doc": "grid: every grid config x fold; random|optuna: sample configs, one trial runs all folds"},
    )
    num_samples: int = field(
        default=8, metadata={"doc": "random|optuna: configs sampled from the grid's lists/distributions"}
    )
    scheduler: str = field(
        default="none",
        metadata={"doc": "random|optuna: none|asha (ASHA stops a whole config after a fold, never one fold)"},
    )
    metric: str = field(default="val_auc", metadata={"doc": "metric that ranks configs (mean over folds)"})
    embed_best: bool = field(
        default=True, metadata={"doc": "extract OOF embeddings for the best config after the sweep"}
    )
    fork_server: bool = field(
        default=True,
        metadata={"doc": "private cluster: trials fork from a process that imported torch/timm (sweep/zygote.py)"},
    )
    ship_checkpoints: bool = field(
        default=False,
        metadata={
            "doc": "cluster/--storage: also copy each epoch's checkpoint into Ray's storage. Off: a retry resumes from RUN_DIR/last_checkpoint in the shared sweep dir (which trials need anyway: they read its config.yaml)"
        },
    )

    def validate(self) -> None:
        check_value(self.folds >= 2, "tune.folds", self.folds, ">= 2")
        check_value(self.cpus_per_trial > 0, "tune.cpus_per_trial", self.cpus_per_trial, "> 0")
        check_value(self.gpus_per_trial >= 0, "tune.gpus_per_trial", self.gpus_per_trial, ">= 0")
        check_value(self.workers_per_trial >= 1, "tune.workers_per_trial", self.workers_per_trial, ">= 1")
        check_value(self.max_concurrent >= 0, "tune.max_concurrent", self.max_concurrent, ">= 0")
        check_value(self.max_failures >= 0, "tune.max_failures", self.max_failures, ">= 0")
        check_choice("tune.search", self.search, SEARCHES)
        check_choice("tune.scheduler", self.scheduler, ("none", "asha"))
        check_value(self.num_samples >= 1, "tune.num_samples", self.num_samples, ">= 1")
        if self.search == "grid" and self.scheduler != "none":
            raise ConfigError(
                f"tune.scheduler={self.scheduler} needs tune.search=random|optuna (one trial per config "
                "runs all folds, so ASHA stops whole configs); pass --search random or --search optuna"
            )
        if self.search != "grid" and self.workers_per_trial > 1:
            raise ConfigError(
                f"tune.search={self.search} runs a config's folds one after another inside one trial; "
                "DDP trials (tune.workers_per_trial > 1) need tune.search=grid"
            )
        if self.search != "grid" and self.asha:
            raise ConfigError(
                f"tune.asha stops single folds of a grid sweep; with tune.search={self.search} set "
                "tune.asha=false and use tune.scheduler=asha (stops whole configs)"
            )
        for k, v in self.grid.items():
            check_value(
                isinstance(v, list) and len(v) >= 1 or isinstance(v, dict) and len(v) == 1,
                f"tune.grid['{k}']",
                v,
                "a non-empty list of values or one {distribution: args} mapping",
            )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "dist": DistConfig,
    "tune": TuneConfig,
    "embed": EmbedConfig,
    "stack": StackConfig,
    "thresholds": ThresholdConfig,
    "export": ExportConfig,
    "eval": EvalConfig,
}


@dataclass
class ExperimentConfig:
    name: str = field(default="experiment", metadata={"doc": "experiment name, used in run folders and reports"})
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


TOP_LEVEL = ("name", *SECTIONS)
