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


def _short(value: float) -> str:
    """3 significant digits as a flag is typed: 2.5e-05 -> '2.5e-5', 1e-4 -> '1e-4', 0.004 -> '0.004'."""
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def lr_derivation(lr: float, blr: float, batch_size: int, accumulation: int, processes: int) -> str:
    """The run's absolute ``lr`` and where it came from, for the log: the scaling rule of `absolute_lr` spelled out
    when ``lr`` is what it gives, else ``lr`` as given by --lr.

    ``lr 2.5e-5 = blr 1e-4 x effective batch 64 / 256 (batch_size 16 x 2 accumulation x 2 processes)``
    """
    effective = batch_size * accumulation * processes
    if lr != absolute_lr(None, blr, effective):
        return f"lr {_short(lr)} (--lr as given; --blr unused)"
    return (f"lr {_short(lr)} = blr {_short(blr)} x effective batch {effective} / 256 (batch_size {batch_size} x "
            f"{accumulation} accumulation x {processes} process{'es' if processes > 1 else ''})")
