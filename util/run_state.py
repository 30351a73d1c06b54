"""A run's state on disk: which checkpoint a run starts from, what a save holds, and restoring it.

Owns the checkpoint file names (`checkpoint_path`: ``checkpoint-last.pth`` and ``checkpoint-<epoch>.pth``,
the original's), the restore policy (`restore`), every rank's RNG state, and the save (`save`) with the
ranks' weight and EMA digests from `util.execution.wrap`. The file format itself (atomic write, safe load, finetune
adaptation, the explanation of a mismatch) is `util.checkpoint`'s.
"""
from __future__ import annotations

import functools
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from models.transdiff import TRANSDIFF_MODELS
from util import distributed as dist
from util.checkpoint import (
    CLASS_EMBEDDING,
    adapt_state_dict,
    check_finite,
    load_checkpoint,
    save_checkpoint,
    select_weights,
    trained_with,
)
from util.errors import Preempted
from util.execution.wrap import replica_digests
from util.optim import full_state_dict

LAST = "last"
SAME_RUN_KEYS = ("model", "mrar", "img_size")  # a training checkpoint with these continues exactly


@dataclass(frozen=True)
class RunSettings:
    """What decides where a run's weights come from, and what its checkpoints record about it."""

    output_dir: str
    flags: dict = field(default_factory=dict)  # every resolved flag: saved as the checkpoint's 'args'
    seed: int = 0                # with world size and batch size: the data order (`util.data.order`)
    batch_size: int = 1          # per process
    accumulation_steps: int = 1  # micro-batches per optimizer step
    resume: str = ""             # a checkpoint file, or a folder holding checkpoint-<load_step>.pth
    init_from: str = ""          # a checkpoint file a new run starts its weights from (a finetune)
    class_rows: dict | None = None  # init_from: class embedding rows to copy, {model row: checkpoint row}
    load_step: str = LAST
    evaluate: bool = False       # load weights only: never the optimizer or the run's own last checkpoint
    allow_random_weights: bool = False  # evaluating without weights is an error unless this
    start_epoch: int = 0         # the first epoch of a run that starts fresh
    save_every_steps: int = 0    # inside an epoch (0: off); see `SavePolicy`
    save_every_minutes: float = 0.0

    def data_order(self) -> dict:
        """The inputs of the data order: a checkpoint inside an epoch continues exactly only under the same ones."""
        return {"seed": self.seed, "world_size": dist.get_world_size(), "batch_size": self.batch_size}

    def continues(self, checkpoint: dict) -> bool:
        """Whether `checkpoint` is a training checkpoint of this run's configuration (then it continues exactly)."""
        stored = checkpoint.get("args", {})
        return ("optimizer" in checkpoint and "epoch" in checkpoint
                and all(stored.get(key) == self.flags.get(key) for key in SAME_RUN_KEYS))


def checkpoint_path(output_dir: str, name: str | int) -> str:
    """``<output_dir>/checkpoint-<name>.pth``; ``name`` is `LAST` (rewritten every save) or an epoch."""
    return os.path.join(output_dir, f"checkpoint-{name}.pth")


def find_resume_checkpoint(resume: str | None, load_step: str = LAST) -> str | None:
    """Resolve ``--resume`` to a checkpoint file, or None when there is nothing to resume from.

    ``resume`` may be a file, or a directory (the original's semantics) holding ``checkpoint-<load_step>.pth``.
    Returns None for an empty argument, a directory without that file, or a path that does not exist yet
    (auto-resume into a fresh ``--output_dir``); the caller warns loudly.
    """
    if not resume:
        return None
    if os.path.isfile(resume):
        return resume
    if not os.path.isdir(resume):
        return None
    candidate = checkpoint_path(resume, load_step)
    return candidate if os.path.isfile(candidate) else None


def rng_state(device: torch.device) -> dict:
    """This process's generator states: torch's CPU one, numpy's, Python's, and that of its own CUDA device (a
    rank trains on one device; the others it may see belong to other ranks)."""
    _, numpy_key, *numpy_position = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": numpy_key.tolist(), "numpy_position": numpy_position,
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def _cuda_state(state: dict, device: torch.device) -> torch.Tensor | None:
    """The saved generator state of `device`: ours (`cuda_device`), or in an older checkpoint's list of every
    visible GPU's states, the entry at the device's index when the list has one."""
    if "cuda_device" in state:
        return state["cuda_device"]
    states = state.get("cuda") or []
    index = device.index if device.index is not None else torch.cuda.current_device()
    return states[index] if index < len(states) else None


def restore_rng_state(states: list | None, device: torch.device) -> bool:
    """Each rank restores its own generator states; False (nothing restored) if the world size changed. A CUDA
    state is restored on the rank's own device; a checkpoint without one for it (saved on CPU, or an older one
    from a layout with fewer visible GPUs) leaves the device's generator as it is, with a warning."""
    if not states or len(states) != dist.get_world_size():
        return False
    state = states[dist.get_rank()]
    torch.set_rng_state(state["torch"])
    name, _, *position = np.random.get_state()  # older checkpoints saved the key alone: keep the position
    np.random.set_state((name, np.array(state["numpy"], dtype=np.uint32), *state.get("numpy_position", position)))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if device.type == "cuda":
        cuda_state = _cuda_state(state, device)
        if cuda_state is None:
            warnings.warn(f"the checkpoint holds no generator state for {device}: its draws differ from an "
                          "uninterrupted run's", stacklevel=2)
        else:
            torch.cuda.set_rng_state(cuda_state, device)
    return True


class Position(NamedTuple):
    """Where training stands: `epoch_step` batches of `epoch` are done (all of them: the epoch is complete)."""

    epoch: int
    epoch_step: int
    steps_per_epoch: int

    @property
    def complete(self) -> bool:
        return self.epoch_step >= self.steps_per_epoch


def save(run: RunSettings, name: str | int, execution, ema, optimizer, scaler, position: Position) -> str:
    """Write ``checkpoint-<name>.pth`` into the run's folder atomically; returns its path. A collective: every rank
    contributes its RNG state and the digests of its weights and its EMA, and a divergence between ranks is an
    error rather than a silently saved rank-0 copy.

    The checkpoint records the position (epoch, batches done of ``steps_per_epoch``, optimizer steps; saves happen
    after an optimizer step, so no accumulation micro-step is pending) and the data order's inputs (seed, world
    size, batch size), so a resumed run skips exactly the batches already trained on.
    """
    device = next(execution.module.parameters()).device
    states = dist.all_gather_object(rng_state(device))
    label = f"epoch {position.epoch}, step {position.epoch_step}"
    weights, digests = execution.state_dict(label)
    ema_digests = replica_digests(ema.module, "EMA weights", label)
    optimizer_state = full_state_dict(optimizer)
    path = checkpoint_path(run.output_dir, name)
    if not dist.is_main_process():
        return path
    optimizer_steps = math.ceil(position.steps_per_epoch / run.accumulation_steps)
    state = {"model": weights, "model_ema": ema.state_dict(), "optimizer": optimizer_state,
             "epoch": position.epoch, "epoch_step": position.epoch_step,
             "steps_per_epoch": position.steps_per_epoch, "accumulation_micro_step": 0,
             "optimizer_step": position.epoch * optimizer_steps + math.ceil(
                 position.epoch_step / run.accumulation_steps),
             "data_order": run.data_order(), "args": run.flags, "rng_states": states,
             "rank_weight_digests": digests, "rank_ema_digests": ema_digests}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    save_checkpoint(path, state)
    return path


class Restored(NamedTuple):
    start_epoch: int  # the first epoch to train
    epoch_label: str  # the checkpoint's epoch, 'released' or 'scratch' (names evaluation folders)
    path: str         # the checkpoint loaded, '' for none
    start_step: int = 0  # batches of start_epoch already trained (a mid-epoch checkpoint)


@functools.cache
def _model_for_width() -> dict[int, str]:
    """Registry width -> the first model name of that width (for the mismatch explanation)."""
    widths = {}
    with torch.device("meta"):
        for name in sorted(TRANSDIFF_MODELS):
            widths.setdefault(TRANSDIFF_MODELS[name]().fake_latent.shape[1], name)
    return widths


def _adapt(weights: dict, target: dict, checkpoint: dict, path: str, class_rows: dict | None,
           training: bool) -> tuple[dict, list[str]]:
    """`adapt_state_dict`, its refusal naming the file and the settings the checkpoint was trained with; a training
    run given a checkpoint of another class count to continue (not to finetune from) is pointed to ``--init_from``."""
    try:
        return adapt_state_dict(weights, target, _model_for_width(), class_rows)
    except ValueError as error:
        message = f"{path}: {error}\n{trained_with(checkpoint)}"
        source, model = weights.get(CLASS_EMBEDDING), target.get(CLASS_EMBEDDING)
        other_classes = source is not None and model is not None and source.shape[0] != model.shape[0]
        if training and class_rows is None and other_classes:
            message += (f"\nto finetune it onto your own {model.shape[0]} classes, start a new run with --init_from "
                        f"{path} (and --class_map FILE to start classes from pretrained ones; docs/finetuning.md)")
        raise ValueError(message) from None


def _class_rows(run: RunSettings, weights: dict, target: dict) -> dict | None:
    """The class embedding rows an ``--init_from`` start copies: the class map's, every row when the class count is
    the same and no map is given, none for another class count without a map (None: no class adaptation)."""
    if run.class_rows is not None:
        return run.class_rows
    source, model = weights.get(CLASS_EMBEDDING), target.get(CLASS_EMBEDDING)
    return {} if source is not None and model is not None and source.shape[0] != model.shape[0] else None


def _stored_epoch(checkpoint: dict, path: str) -> int:
    """The checkpoint's epoch (-1 when it has none: released weights); anything but an integer >= 0 is refused."""
    epoch = checkpoint.get("epoch", -1)
    if "epoch" in checkpoint and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise ValueError(f"{path}: its epoch {epoch!r} is not an epoch (an integer >= 0); the file is damaged or not "
                         "a training checkpoint")
    return epoch


def _stored_position(checkpoint: dict, epoch: int, path: str) -> Position:
    """Where the checkpoint's epoch stands; older checkpoints without a position hold a complete epoch."""
    position = Position(epoch, checkpoint.get("epoch_step", 1), checkpoint.get("steps_per_epoch", 1))
    numbers = all(isinstance(n, int) and not isinstance(n, bool) for n in position)
    if not numbers or position.steps_per_epoch < 1 or not 0 <= position.epoch_step <= position.steps_per_epoch:
        raise ValueError(f"{path}: its position ({position.epoch_step!r} of {position.steps_per_epoch!r} batches of "
                         f"epoch {epoch}) is not a position in an epoch; the file is damaged")
    return position


def restore(run: RunSettings, model, ema, optimizer, scaler, logger) -> Restored:
    """Load the checkpoint a run starts from (``optimizer`` and ``scaler`` are None when evaluating).

    Our own run's ``<output_dir>/checkpoint-last.pth`` wins (an interrupted run continues exactly: weights,
    EMA, optimizer, scaler, epoch and every rank's RNG state). Otherwise ``--init_from`` starts a new run (epoch 0,
    fresh optimizer) from its weights, the class embedding rebuilt by ``class_rows`` (`_class_rows`) when the
    class count differs or a class map is given. Otherwise ``--resume`` continues exactly when
    it is a training checkpoint of the same configuration, and initialises the weights (adapting new-shaped
    tensors, starting at epoch 0) when it is a released or differently-shaped checkpoint, e.g. a 1-step
    model for an MRAR or 512 px finetune. A checkpoint that does not fit raises ValueError explaining which
    flag to change.
    """
    own = checkpoint_path(run.output_dir, LAST)
    path, initialising = None, False
    if not run.evaluate and os.path.isfile(own):
        path = own
    elif run.init_from:
        path, initialising = run.init_from, True
    elif run.resume:
        if not os.path.exists(run.resume):
            raise FileNotFoundError(f"--resume {run.resume}: no such file or folder")
        path = find_resume_checkpoint(run.resume, run.load_step)
        if path is None:
            message = f"--resume {run.resume}: no checkpoint-{run.load_step}.pth in this folder"
            if run.evaluate:
                raise FileNotFoundError(message + "; nothing to evaluate")
            logger.warning("!" * 80 + f"\n{message}; TRAINING FROM SCRATCH\n" + "!" * 80)
    if path is None:
        if run.evaluate and not run.allow_random_weights:
            raise ValueError("--evaluate needs weights: pass --resume <checkpoint or folder> (or "
                             "--allow_random_weights to score an untrained model)")
        return Restored(run.start_epoch, "scratch", "")

    checkpoint = load_checkpoint(path)
    raw, source = select_weights(checkpoint, use_ema=False)
    raw_ema, ema_source = select_weights(checkpoint, use_ema=True)
    check_finite(raw, f"{path} ({source})")
    check_finite(raw_ema, f"{path} ({ema_source})")
    target = model.state_dict()
    class_rows = _class_rows(run, raw, target) if initialising else None
    weights, report = _adapt(raw, target, checkpoint, path, class_rows, training=not run.evaluate)
    model.load_state_dict(weights, strict=True)
    ema.load_state_dict(_adapt(raw_ema, target, checkpoint, path, class_rows, training=not run.evaluate)[0])
    for line in report:
        logger.info(f"adapted: {line}")
    epoch = _stored_epoch(checkpoint, path)
    if run.continues(checkpoint) and not run.evaluate and not initialising:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        same_order = checkpoint.get("data_order") == run.data_order()
        device = next(model.parameters()).device
        if not restore_rng_state(checkpoint.get("rng_states"), device):
            logger.warning("the world size changed since this checkpoint: training continues, but its random "
                           "draws differ from an uninterrupted run")
        position = _stored_position(checkpoint, epoch, path)
        if position.complete:
            logger.info(f"resumed {path} (epoch {epoch}): continuing at epoch {epoch + 1}")
            return Restored(epoch + 1, str(epoch), path)
        if not same_order:
            logger.warning(f"{path} stopped inside epoch {epoch}, but the seed, world size or batch size changed: "
                           f"epoch {epoch} starts again from its first batch")
            return Restored(epoch, str(epoch), path)
        logger.info(f"resumed {path} (epoch {epoch}, {position.epoch_step} of {position.steps_per_epoch} batches "
                    f"done): continuing at batch {position.epoch_step}")
        return Restored(epoch, str(epoch), path, position.epoch_step)
    if run.evaluate:
        logger.info(f"evaluating weights from {path} (epoch {epoch})")
        return Restored(run.start_epoch, str(epoch) if epoch >= 0 else "released", path)
    logger.info(f"initialised from {path} ({source}, epoch {epoch}); optimizer and epoch start fresh")
    return Restored(0, str(epoch) if epoch >= 0 else "released", path)


class SavePolicy:
    """When to write ``checkpoint-last.pth`` inside an epoch: every ``every_steps`` optimizer steps, every
    ``every_minutes`` minutes of rank 0's clock, and at the next optimizer step after a SIGTERM (pre-emption).

    `decide` is called by every rank after every optimizer step; the ranks agree on its answer (a SIGTERM on any
    rank and rank 0's clock are summed over the ranks), so every rank saves at the same step. A second SIGTERM
    kills the process as usual, e.g. when the first one arrives during an evaluation.
    """

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0):
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.terminated = False
        self.last_save = time.monotonic()
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        if self.terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        self.terminated = True

    def decide(self, optimizer_step: int) -> tuple[bool, bool]:
        """(save now, stop after saving) after global optimizer step ``optimizer_step``."""
        clock_due = (self.every_minutes > 0 and dist.is_main_process()
                     and time.monotonic() - self.last_save >= 60 * self.every_minutes)
        terminated, clock_due = dist.all_reduce_sum([float(self.terminated), float(clock_due)])
        steps_due = self.every_steps > 0 and optimizer_step % self.every_steps == 0
        return bool(steps_due or terminated or clock_due), bool(terminated)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous_handler)


class Checkpointer:
    """A training run's saves: at the ends of epochs (`save`) and inside them (`inside_epoch`, by `SavePolicy`)."""

    def __init__(self, run: RunSettings, execution, ema, optimizer, scaler, steps_per_epoch: int, logger,
                 before_save: Callable[[], None] = lambda: None, after_save: Callable[[], None] = lambda: None):
        """`before_save()` runs before every save and raises to stop a run whose state must not be saved (the
        engine's check of the loss and the weights); `after_save()` runs after it (the run's `args.json`)."""
        self.run, self.execution, self.ema, self.optimizer, self.scaler = run, execution, ema, optimizer, scaler
        self.steps = steps_per_epoch
        self.logger = logger
        self.before_save, self.after_save = before_save, after_save
        self.optimizer_steps_per_epoch = math.ceil(steps_per_epoch / run.accumulation_steps)
        self.policy = SavePolicy(run.save_every_steps, run.save_every_minutes)

    def save(self, name: str | int, epoch: int, epoch_step: int) -> str:
        self.before_save()
        path = save(self.run, name, self.execution, self.ema, self.optimizer, self.scaler,
                    Position(epoch, epoch_step, self.steps))
        self.after_save()
        self.policy.saved()
        return path

    def inside_epoch(self, epoch: int, epoch_step: int) -> None:
        """After an optimizer step that left `epoch_step` batches of `epoch` done: save if due; after a SIGTERM,
        save and raise Preempted."""
        if epoch_step >= self.steps:
            return  # the end-of-epoch saves
        optimizer_step = (epoch * self.optimizer_steps_per_epoch
                          + math.ceil(epoch_step / self.run.accumulation_steps))
        due, stop = self.policy.decide(optimizer_step)
        if not due:
            return
        path = self.save(LAST, epoch, epoch_step)
        self.logger.info(f"saved {path} at epoch {epoch}, batch {epoch_step} of {self.steps}")
        if stop:
            raise Preempted(f"SIGTERM: saved {path} at epoch {epoch}, batch {epoch_step}; rerun the same command "
                            "to continue")

    def close(self) -> None:
        self.policy.close()
