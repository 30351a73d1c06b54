"""Rank-0 logging: a text logger (stdout + ``log.txt``), progress lines with ETA, tensorboard scalars.

Only global rank 0 writes anything; on other ranks every object here accepts the same calls and does
nothing, so callers never test the rank themselves.
"""
from __future__ import annotations

import collections
import datetime
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from util.distributed import all_reduce_sum, is_main_process, print0

LOGGER_NAME = "transdiff"


def create_logger(output_dir: str | None) -> logging.Logger:
    """Logger writing ``[time] message`` to stdout and ``<output_dir>/log.txt`` on rank 0.

    Other ranks get a logger that discards everything. Calling it again replaces the handlers, so
    one process can start several runs. ``output_dir=None`` logs to stdout only.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if not is_main_process():
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
        return logger
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


class SmoothedValue:
    """A scalar series: windowed median/average plus the global average since the start."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window = collections.deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        """Record ``value``, which stands for ``n`` samples in the global average."""
        self.window.append(value)
        self.total += value * n
        self.count += n

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over ranks (the window stays local)."""
        count, self.total = all_reduce_sum([self.count, self.total])
        self.count = int(count)

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.window)).median().item()) if self.window else float("nan")

    @property
    def avg(self) -> float:
        return sum(self.window) / len(self.window) if self.window else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def max(self) -> float:
        return max(self.window) if self.window else float("nan")

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named :class:`SmoothedValue` meters and a progress iterator printing ETA every few steps."""

    def __init__(self, delimiter: str = "  ", print_fn: Callable[[str], Any] = print0):
        self.meters: dict[str, SmoothedValue] = collections.defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.print_fn = print_fn

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Register a meter with its own window or format (e.g. ``'lr'`` with ``'{value:.6f}'``)."""
        self.meters[name] = meter

    def update(self, **values: float | torch.Tensor) -> None:
        """Record one value per named meter; tensors must be scalars."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def synchronize_between_processes(self) -> None:
        """Make global averages cover all ranks."""
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        """Yield from ``iterable``; every ``print_freq`` steps and at the end print progress and ETA."""
        total = len(iterable)  # type: ignore[arg-type]
        width = len(str(total))
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for step, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if step % print_freq == 0 or step == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - step - 1)))
                parts = [header, f"[{step:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB")
                self.print_fn(self.delimiter.join(part for part in parts if part))
            end = time.time()
        elapsed = time.time() - start
        self.print_fn(f"{header} total time: {datetime.timedelta(seconds=int(elapsed))} "
                      f"({elapsed / max(total, 1):.4f} s / it)")


class TensorboardWriter:
    """``SummaryWriter`` on rank 0; a no-op elsewhere or when tensorboard is not installed."""

    def __init__(self, log_dir: str | None, enabled: bool = True, purge_step: int | None = None):
        """``purge_step``: a resumed run's first step; events at or after it from the interrupted run are dropped."""
        self._writer = None
        if not (enabled and log_dir is not None and is_main_process()):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            warnings.warn(f"tensorboard is not available ({error}); scalars will not be written", stacklevel=2)
            return
        os.makedirs(log_dir, exist_ok=True)
        self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    @property
    def active(self) -> bool:
        """True when scalars are actually written."""
        return self._writer is not None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Record ``value`` under ``tag`` at x = ``step``."""
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def add_image(self, tag: str, image, step: int) -> None:
        """Record a uint8 ``[H, W, 3]`` image under ``tag`` at x = ``step``."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        """Write pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
