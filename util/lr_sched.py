"""Learning-rate schedule of MAR/TransDiff: per-iteration linear warm-up, then constant or cosine.

``epoch`` is fractional (``epoch + step / steps_per_epoch``) so the warm-up and the decay move every
iteration. The original's default schedule is ``constant``; ``cosine`` is a half cycle from ``lr`` to
``min_lr`` over the epochs after the warm-up.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SCHEDULES = ("constant", "cosine")


def lr_at(epoch: float, lr: float, warmup_epochs: float, epochs: float, schedule: str = "constant",
          min_lr: float = 0.0) -> float:
    """Learning rate at fractional ``epoch`` (pure function of its arguments)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {SCHEDULES}")
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if schedule == "constant":
        return lr
    decay_epochs = epochs - warmup_epochs
    progress = min((epoch - warmup_epochs) / decay_epochs, 1.0) if decay_epochs > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LrSchedule(NamedTuple):
    """A run's learning-rate schedule (the absolute `lr`, see `absolute_lr`)."""

    lr: float
    warmup_epochs: float
    epochs: float
    schedule: str = "constant"
    min_lr: float = 0.0

    def at(self, epoch: float) -> float:
        return lr_at(epoch, self.lr, self.warmup_epochs, self.epochs, self.schedule, self.min_lr)


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, schedule: LrSchedule) -> float:
    """Set every param group's lr for fractional ``epoch`` and return the base lr; a group's ``lr_scale``
    multiplies the base lr."""
    lr = schedule.at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def absolute_lr(lr: float | None, blr: float, eff_batch_size: int) -> float:
    """``lr`` if given, else ``blr * eff_batch_size / 256`` (MAR's linear scaling rule).

    ``eff_batch_size`` = per-process batch size x world size x gradient accumulation steps.
    """
    return lr if lr is not None else blr * eff_batch_size / 256
