"""How the model is run: the one place that wraps it for an execution strategy.

`wrap_model` returns an `Execution`: the module the training step calls (`train_module`), the plain model
(`module`, whose parameters the optimizer and the EMA see), a gradient-sync context for accumulation, and
the full state dict for saving with the check that every rank holds the same weights. Strategies:

* ``ddp``: DistributedDataParallel when a process group exists, the plain model in a world of one.

Compiled execution (``compile=True``, `--compile`) compiles every encoder and decoder block in place
(`compile_blocks`) before the strategy wraps the model. A block is compiled as one graph (``fullgraph``: a
graph break is an error), so the attention, MLP and modulation of a block run as one inductor program on CPU
and CUDA alike, inside gradient checkpointing, DDP and MRAR unchanged; the code between blocks (label drop,
noise draws from generators, the loss) stays eager. Parameter names do not change, so a compiled run saves and
loads the same checkpoints as an eager one.

A new strategy (sharding) adds its wrapper here and keeps `state_dict` returning the full, unprefixed state
dict, so checkpoints do not depend on how the model was run.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect

import torch
from torch.nn.parallel import DistributedDataParallel

from util import distributed as dist
from util.errors import RunError

STRATEGIES = ("ddp",)
# Gradients are views into DDP's communication buckets (no copy in and out of them, one gradient-sized buffer
# less); and no buffer is broadcast before every forward: TransDiff's only buffer, the MRAR attention mask, is a
# constant that every rank builds the same. The results are those of DDP's defaults, bit for bit. (torch 2.14
# names the buffer switch `forward_sync_buffers`; earlier versions `broadcast_buffers`.)
_DDP_PARAMETERS = inspect.signature(DistributedDataParallel).parameters
_BUFFER_SYNC = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMETERS else "broadcast_buffers"
DDP_OPTIONS = {"gradient_as_bucket_view": True, _BUFFER_SYNC: False}


class RanksDiverged(RunError):
    """The ranks' weights differ where a replicated strategy keeps them identical."""


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on all ranks iff their weights are identical."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_digests(module: torch.nn.Module, what: str, label: str) -> list[str]:
    """Every rank's `parameter_digest` of its copy of `module`, in rank order (a collective: all ranks call it).

    Raises RanksDiverged, naming `what` (the weights, the EMA) and `label` (where the run is), when they differ.
    """
    digests = dist.all_gather_object(parameter_digest(module))
    if len(set(digests)) != 1:
        raise RanksDiverged(f"the ranks' {what} diverged at {label}: {digests}")
    return digests


def compiled_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks `compile_blocks` compiles: the encoder's and the velocity network's."""
    return [*model.encoder_blocks, *model.diffdecoder.net.res_blocks]


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every block of `model` in place (`torch.compile`, fullgraph); the first call of each shape
    compiles (seconds to minutes), later calls run the compiled code. Idempotent.

    On CPU the compiled blocks draw their dropout masks from torch's generator, as eager execution does
    (inductor's `fallback_random`): the masks are eager's, and inductor's own CPU generator was the slower one
    (a TransDiff-B decoder block, batch 8 x 256 tokens, dropout 0.1, forward and backward on one thread: 1.68 s
    with it, 1.35 s with torch's, 1.35 s eager). On CUDA inductor keeps its own generator, fused into the kernels.
    """
    torch_random = next(model.parameters()).device.type == "cpu"
    for block in compiled_blocks(model):
        if block._compiled_call_impl is None:
            block.compile(fullgraph=True, options={"fallback_random": torch_random})


class Execution:
    """A model wrapped for one strategy (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, train_module: torch.nn.Module, strategy: str, compiled: bool):
        self.module = module
        self.train_module = train_module
        self.strategy = strategy
        self.compiled = compiled
        self.first_step_done = False  # the engine logs the first (compiling) step of a compiled execution

    def grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step; ``sync=False`` skips the gradient all-reduce (accumulation)."""
        return dist.ddp_sync(self.train_module, sync)

    def state_dict(self, label: str) -> tuple[dict, list[str]]:
        """The full state dict to save and the ranks' digests (a collective: all ranks call it).

        Raises RanksDiverged, naming ``label`` (e.g. the epoch), when a replicated strategy's ranks differ,
        rather than silently saving rank 0's copy.
        """
        return self.module.state_dict(), replica_digests(self.module, "weights", label)


def wrap_model(model: torch.nn.Module, device: torch.device, strategy: str = "ddp",
               compile: bool = False) -> Execution:
    """Wrap ``model`` (already on ``device``) for ``strategy``; ``compile`` compiles its blocks first."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown execution strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if compile:
        compile_blocks(model)
    train_module = model
    if dist.is_initialized():
        train_module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               **DDP_OPTIONS)
    return Execution(model, train_module, strategy, compile)
