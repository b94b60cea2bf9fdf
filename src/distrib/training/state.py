"""The training state the loop reads and advances: model, optimizer, loaders, positions, best metrics.

Built by ``setup.build_trainer``; saved and restored through ``trainer_state``/``rank_state``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path

import torch

from distrib.config import ExperimentConfig, config_to_dict
from distrib.training.checkpoint import plain, rng_state, set_rng_state
from distrib.training.runlog import RunLogger


@dataclasses.dataclass
class Trainer:
    """The training state the loop reads and advances (positions count per-rank micro-batches)."""

    cfg: ExperimentConfig
    out: Path
    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    loss_fn: object
    val_loader: object
    log: RunLogger | None
    train_folds: list
    micro_per_epoch: int
    steps_per_epoch: int
    mean_std: tuple | None = None
    augment_on: str = "loader"  # augment.device resolved: 'loader' (workers) or 'model' (in to_device, on the device)
    decode_on: str = "cpu"  # data.decode_device: 'cpu' (workers) or 'cuda' (batched decode in to_device)
    teacher: torch.nn.Module | None = None
    teacher_size: int = 0  # the teacher's input size (student images are resized to it)
    epoch: int = 0
    pos: int = 0  # micro-batches of the current epoch already trained on
    step: int = 0  # optimizer steps so far
    done: bool = False
    loss_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    loss_count: int = 0
    skipped_train: int = 0  # corrupt training samples the loader skipped on this rank (completed epochs)
    _loader: object = None  # this epoch's training loader (its skip counts are read at epoch end)
    best_auc: float = -math.inf
    best_epoch: int = -1
    best_metrics: dict = dataclasses.field(default_factory=dict)
    epoch_rng: dict | None = None  # RNG at the start of this epoch (re-creates its data iterator)
    pending_rng: dict | None = None  # RNG to restore after a resume has skipped consumed batches
    elapsed_before: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def _train_loader(self, epoch: int):
        from distrib.data.loader import build_loader
        from distrib.data.transforms import build_transform

        d, acc = self.cfg.data, self.accelerator
        return build_loader(
            d.shards,
            "train",
            self.train_folds,
            acc.process_index,
            acc.num_processes,
            d.num_workers,
            d.batch_size,
            epoch,
            build_transform(self.cfg.augment, d, train=True, mean_std=self.mean_std),
            d.seed,
            mode="train",
            samples_per_epoch=d.samples_per_epoch,
            shuffle_buffer=d.shuffle_buffer,
            augment_on=self.augment_on,
            decode_on=self.decode_on,
            pin_memory=acc.device.type == "cuda",
        )

    def epoch_batches(self):
        """This epoch's batches; after a resume the consumed ones are read and dropped.

        The loader is deterministic given (seed, epoch), and the RNG is rewound to the epoch start
        before the iterator is created, so the skipped prefix is exactly what the killed run saw.
        """
        if self.pos == 0:
            if self.pending_rng is not None:
                set_rng_state(self.pending_rng)
                self.pending_rng = None
            self.epoch_rng = rng_state()
        else:
            set_rng_state(self.epoch_rng)
        self._loader = self._train_loader(self.epoch)
        it = itertools.islice(iter(self._loader), self.micro_per_epoch)
        for _ in range(self.pos):
            next(it)
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        self.accelerator.step = 0  # accumulation restarts each epoch (pos is a multiple of grad_accum)
        return it

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels on the device; with augment.device=model the loader's augmentation runs here."""
        dev, channels_last = self.accelerator.device, self.cfg.train.channels_last
        if self._loader is not None:
            images = self._loader.to_device(batch, dev, channels_last)
        else:  # in-memory batches (bench trainer): already float
            images = batch["image"].to(dev, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        return images, batch["label"].to(dev, non_blocking=True)

    def compute_loss(self, output, target: torch.Tensor, images: torch.Tensor):
        """The configured loss, or alpha*KD(T) + (1-alpha)*CE against the frozen teacher."""
        if self.teacher is None:
            return self.loss_fn(output, target, images)
        from distrib.training.losses import distill_loss

        tc = self.cfg.train
        with torch.no_grad():
            teacher_out = self.teacher(self._teacher_input(images))
        loss = distill_loss(output, teacher_out, target, tc.distill_alpha, tc.distill_temperature, tc.label_smoothing)
        return loss, {}

    def _teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        size = self.teacher_size
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])  # set by the scheduler for the next step

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.perf_counter() - self.started, 3)

    def trainer_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "step": self.step,
            "done": self.done,
            "best_auc": float(self.best_auc),
            "best_epoch": self.best_epoch,
            "best_metrics": plain(self.best_metrics),
            "scheduler": self.scheduler.state_dict(),
            "elapsed": self.elapsed(),
            "world_size": self.accelerator.num_processes,
            "grad_accum": self.cfg.train.grad_accum,
            "config": plain(config_to_dict(self.cfg)),
        }  # what trained these weights: the --resume guard reads it

    def rank_state(self) -> dict:
        """Per-rank part of a checkpoint: RNG streams and the running train-loss sum."""
        return {
            "epoch_start": self.epoch_rng,
            "now": rng_state(),
            "loss_sum": self.loss_sum.cpu(),
            "loss_count": self.loss_count,
            "skipped_train": self.skipped_train,
        }

    def end_epoch(self) -> None:
        """Close the progress bar and count the samples the loader skipped (reported, never silent)."""
        self.log.end_epoch()
        self.skipped_train += int(self._loader.skipped) if self._loader is not None else 0

    def skipped_counts(self) -> dict:
        """Skipped corrupt samples summed over ranks: training (all epochs) and the last validation."""
        acc = self.accelerator
        local = torch.tensor([self.skipped_train, int(self.val_loader.skipped)], dtype=torch.int64, device=acc.device)
        total = acc.reduce(local, "sum").tolist()
        return {"train": int(total[0]), "val": int(total[1])}
