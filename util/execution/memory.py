"""Peak memory of one training step, predicted by torch's memory tracker on fake tensors, and measured on a CPU.

`predict_step_memory` runs the training step of `engine_transdiff` (forward under autocast, backward, gradient
clipping, the AdamW step, `zero_grad`, the EMA update) on a model whose tensors are fake
(`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and storages without memory), so TransDiff-H
costs no memory. torch's `MemTracker` (`torch.distributed._tools.mem_tracker`) follows every
storage the step creates and frees and reports the peak of the live bytes, by category (weights, gradients,
optimizer state, activations, backward temporaries). AdamW's state is created first, as the first step leaves
it, so the tracked step is a second step.

What is modelled:

* **Kernels** (`kernels`). Fake tensors live on the CPU (without a CUDA driver torch cannot fake a CUDA
  device), so by default they would run the CPU's kernels: attention in the math path, which with dropout keeps
  the [B, H, L, L] probabilities and a float dropout mask, and dropout with a float mask. ``cuda`` runs instead,
  on the same fake tensors, the kernels CUDA picks (`cuda_kernels`): flash attention (bf16 and fp16 without a
  mask) or memory-efficient attention (float32, or MRAR's block-causal mask), which keep the output and the
  log-sum-exp, and `native_dropout` with its one-byte mask. ``cpu`` keeps the CPU's kernels: the prediction
  that `measure_step_memory` checks.
* **DDP** (`world` > 1). With `gradient_as_bucket_view` the gradients are views into DDP's buckets, which hold
  every trainable parameter's gradient for the whole run; they are modelled as gradients that `zero_grad` keeps
  (`set_to_none=False`), so they count in the forward too. A world of one has no DDP: `zero_grad` frees them.
* **ZeRO-1** (`zero1`). The optimizer is `util.optim.build_optimizer`'s `ZeroRedundancyOptimizer` over a fake
  process group (`torch.distributed`'s ``fake`` backend, rank 0 of `world`): rank 0 creates and steps the AdamW
  state of the parameters torch's partition gives it, about 1/world of them (its greedy partition by size puts
  every rank within one tensor of that); the broadcasts move no memory.
* **Gradient checkpointing** is the model's own (`grad_checkpointing` of the model `build_model` builds).

What is not: the CUDA caching allocator's rounding and fragmentation (reserved above allocated), the CUDA
context, cuBLAS and cuDNN workspaces, kernels' internal scratch buffers and NCCL's buffers, which live outside
the tensors torch tracks; `fits` adds a stated margin for them. The tokenizer is not part of the step: the
latents are given (the latent cache); encoding images on the GPU adds the VAE's weights.

`measure_step_memory` runs the same step for real. On a CPU it reads, under torch's profiler
(`profile_memory`), the CPU allocator's own count of the bytes it has handed out since before the model was
built: the measurement a prediction with ``kernels="cpu"`` must match. On a CUDA GPU it reads the caching
allocator's statistics, allocated (to match ``kernels="cuda"``) and reserved.
"""
from __future__ import annotations

import contextlib
import io
from typing import Callable, Iterator, NamedTuple
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.profiler import ProfilerActivity, profile, record_function

from util.execution.precision import autocast_context
from util.optim import EMA, build_optimizer

KERNELS = ("cuda", "cpu")
PRECISIONS = ("bf16", "fp32")
GRAD_CLIP = 3.0  # the README's --grad_clip
EMA_RATE = 0.9999
MEASURED_STEP = "measured training step"  # the profiler range of measure_step_memory's second step
TOTAL = "Total"  # MemTracker's key of a snapshot's sum

# The margin `fits` adds for what the tracker does not see (module docstring): the caching allocator's
# fragmentation as a factor on the prediction, and the CUDA context, library workspaces and NCCL's buffers as a
# fixed amount. Assumed, not measured: benchmarks/gpu.sh prints the allocator's allocated and reserved peaks
# next to the prediction, which calibrates both.
FRAGMENTATION = 1.10
FIXED_OVERHEAD = 2 * 2 ** 30  # bytes


class StepMemory(NamedTuple):
    """The predicted memory of a training step, in bytes."""

    peak: int                # the step's peak
    resident: int            # held between steps: weights, EMA, optimizer state, DDP's buckets, the batch
    at_peak: dict[str, int]  # the peak by MemTracker's categories


class Measurement(NamedTuple):
    """The memory of a training step run for real, in bytes."""

    peak: int                # the allocator's peak of bytes in use during the step
    resident: int            # in use before the step
    reserved: int | None     # CUDA: the caching allocator's reserved peak (allocated plus its cache); CPU: None


class _Tracker(MemTracker):
    """torch 2.14's MemTracker with two changes to private methods, neither of which changes a total.

    * Frozen parameters: it registers a gradient hook on every parameter of each module it meets, which raises
      for a parameter that does not require gradients (TransDiff's unused `z_proj`, the encoder under
      `--only_train_diff`). Here a module's parameters get the hooks only when all of them are trainable. The
      hooks only label a tensor as a gradient; an unlabelled gradient counts as a backward temporary.
    * Only the global peak: it also keeps every module's own peak, a pass over all modules at every operation,
      which nothing here reads.
    """

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True
                                         ) -> tuple[int, int]:
        trainable = all(param.requires_grad for param in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[TOTAL]:
                self._peak_mem[device] = snapshot[TOTAL]
                self._peak_mem_snap[device] = dict(snapshot)


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """The attention kernel CUDA's `scaled_dot_product_attention` picks, with its saved tensors: flash attention
    for bf16/fp16 without a mask, else memory-efficient attention (a bool mask becomes an additive bias, as
    torch converts it). q [B, H, L, E], k, v [B, H, S, E] -> [B, H, L, E]."""
    if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    bias = attn_mask
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)  # [1, 1, L, S]
        bias.masked_fill_(~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, query.requires_grad, dropout_p, is_causal, scale=scale)[0]


def fused_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
                  ) -> torch.Tensor:
    """CUDA's dropout: `native_dropout`, whose saved mask is bool (the CPU's is a float tensor). `inplace`, which
    TransDiff never sets, is accepted with `F.dropout`'s signature and ignored."""
    if not training or p == 0.0:
        return input
    return torch.ops.aten.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def cuda_kernels() -> Iterator[None]:
    """Attention and dropout run with the kernels CUDA picks (`fused_attention`, `fused_dropout`), on any device's
    tensors, while the context lasts. It replaces the two functions of `torch.nn.functional`, where the model
    looks them up: a torch-function mode would not reach the recomputation of checkpointed blocks, which runs
    in the backward pass, outside the mode's handler."""
    with mock.patch.object(F, "scaled_dot_product_attention", fused_attention), \
            mock.patch.object(F, "dropout", fused_dropout):
        yield


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    """A fake process group of `world` ranks, this process rank 0, when `world` > 1 (collectives move nothing)."""
    if world <= 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("predicting a world of ranks needs a process without a process group")
    dist.init_process_group("fake", rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def example_batch(model: torch.nn.Module, batch: int) -> tuple:
    """`batch` random latents of the model's shape (MRAR: one per stage) and class-0 labels, on the current
    device and mode."""
    shape = (batch, model.vae_embed_dim, model.latent_size, model.latent_size)  # [B, C, h, w]
    latents = [torch.randn(shape) for _ in range(model.num_stages)] if model.mrar else torch.randn(shape)
    return latents, torch.zeros(batch, dtype=torch.long)  # [B]


class TrainingStep:
    """The optimizer step of `engine_transdiff.train_one_epoch` without accumulation: forward under autocast,
    backward, clipping, AdamW, `zero_grad`, EMA update. `keep_gradients` zeroes the gradients in place instead of
    freeing them (DDP's buckets)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, batch: tuple,
                 precision: str, device_type: str = "cpu", keep_gradients: bool = False):
        self.model, self.optimizer, self.ema, self.batch = model, optimizer, ema, batch
        self.autocast = autocast_context(precision, device_type)
        self.keep_gradients = keep_gradients

    def create_optimizer_state(self) -> None:
        """AdamW's state as the first step leaves it: one optimizer step on zero gradients, without the forward
        and backward passes."""
        for param in self.model.parameters():
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.keep_gradients)

    def __call__(self) -> None:
        with self.autocast():
            loss = self.model(*self.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.keep_gradients)
        self.ema.update(self.model, EMA_RATE)


def _quiet_optimizer(model: torch.nn.Module, device_type: str, zero1: bool) -> torch.optim.Optimizer:
    """`build_optimizer`'s AdamW (ZeRO-1 under a process group), without its printed grouping."""
    with contextlib.redirect_stdout(io.StringIO()):
        return build_optimizer(model, lr=1e-4, weight_decay=0.02, device_type=device_type, shard_state=zero1)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: a ZeroRedundancyOptimizer's local AdamW, else itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def predict_step_memory(build_model: Callable[[], torch.nn.Module], batch: int, precision: str = "bf16",
                        world: int = 1, zero1: bool = False, kernels: str = "cuda") -> StepMemory:
    """The memory of a training step of `build_model()`'s model at `batch` samples (each with the model's
    `diffusion_batch_mul` copies), per rank of a DDP run of `world` ranks (`zero1`: ZeRO-1 over them), with
    `kernels`' attention and dropout (module docstring); nothing is allocated."""
    _check_precision(precision)
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
    if zero1 and world <= 1:
        raise ValueError("ZeRO-1 shards the optimizer state over a world of 2 or more ranks")
    with torch.device("meta"):
        model = build_model().train()
    ema = EMA(model)  # a copy on the meta device: a fake tensor cannot be deep-copied
    kernel_mode = cuda_kernels() if kernels == "cuda" else contextlib.nullcontext()
    with fake_world(world), FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        ema.module.to_empty(device="cpu")
        optimizer = _quiet_optimizer(model, kernels, zero1)
        inputs = example_batch(model, batch)
        step = TrainingStep(model, optimizer, ema, inputs, precision, keep_gradients=world > 1)  # CPU autocast
        step.create_optimizer_state()
        with kernel_mode:
            tracker = _Tracker()
            tracker.track_external(model, local_optimizer(optimizer), ema.module, inputs)
            resident = tracker.get_tracker_snapshot()
            with tracker:
                step()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return StepMemory(peak[TOTAL], next(iter(resident.values()))[TOTAL],
                      {getattr(kind, "value", kind): size for kind, size in peak.items() if kind != TOTAL})


def real_step(build_model: Callable[[], torch.nn.Module], batch: int, precision: str, device: torch.device
              ) -> TrainingStep:
    """`predict_step_memory`'s step (a world of one) with real tensors on `device`."""
    with torch.device(device):
        model = build_model().train()
        ema = EMA(model)
        inputs = example_batch(model, batch)
    return TrainingStep(model, _quiet_optimizer(model, device.type, zero1=False), ema, inputs, precision,
                        device.type)


def _allocated_curve(prof: profile) -> list[tuple[int, int]]:
    """(time in ns, bytes the CPU allocator has handed out since profiling began) after each allocation or free."""
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    curve, allocated = [], 0
    for time_ns, change in events:
        allocated += change
        curve.append((time_ns, allocated))
    return curve


def _measured_window(prof: profile) -> tuple[int, int]:
    """Start and end (ns) of the profiler range `MEASURED_STEP`."""
    event = next(event for event in prof.profiler.kineto_results.events() if event.name() == MEASURED_STEP)
    return event.start_ns(), event.end_ns()


def _measure_on_cpu(build_model: Callable[[], torch.nn.Module], batch: int, precision: str) -> Measurement:
    """The CPU allocator's bytes in use, counted by torch's profiler from before the model is built."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = real_step(build_model, batch, precision, torch.device("cpu"))
        step()
        with record_function(MEASURED_STEP):
            step()
    start, end = _measured_window(prof)
    curve = _allocated_curve(prof)
    resident = next(allocated for time_ns, allocated in reversed(curve) if time_ns < start)
    return Measurement(max(allocated for time_ns, allocated in curve if start <= time_ns <= end), resident, None)


def _measure_on_cuda(build_model: Callable[[], torch.nn.Module], batch: int, precision: str,
                     device: torch.device) -> Measurement:
    """The CUDA caching allocator's statistics: allocated bytes, and the reserved peak."""
    step = real_step(build_model, batch, precision, device)
    step()
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return Measurement(torch.cuda.max_memory_allocated(device), resident, torch.cuda.max_memory_reserved(device))


def measure_step_memory(build_model: Callable[[], torch.nn.Module], batch: int, precision: str = "fp32",
                        device: torch.device = torch.device("cpu")) -> Measurement:
    """The memory of `predict_step_memory`'s step (a world of one), run for real on `device`: the allocator's
    bytes in use at the second step's peak and before it. A CPU's must match the prediction with
    ``kernels="cpu"``, a CUDA GPU's the one with ``kernels="cuda"``."""
    _check_precision(precision)
    if device.type == "cuda":
        return _measure_on_cuda(build_model, batch, precision, device)
    return _measure_on_cpu(build_model, batch, precision)


def fits(peak: int, capacity: int) -> bool:
    """Whether a step of predicted `peak` bytes fits a GPU of `capacity` bytes, with the margin
    (`FRAGMENTATION`, `FIXED_OVERHEAD`) for what the prediction does not count."""
    return peak * FRAGMENTATION + FIXED_OVERHEAD <= capacity


def largest_batch(peak_at: Callable[[int], int], capacity: int, line: tuple[int, int] = (16, 32)) -> int:
    """The largest batch whose `peak_at(batch)` `fits` `capacity` (0 if none does). The peak grows linearly with
    the batch once the activations dominate: the line through the batches `line` gives a first guess; a bracket
    grown from it in doubling steps and a bisection make it exact."""
    if not fits(peak_at(1), capacity):
        return 0
    first, second = line
    at_first = peak_at(first)
    slope = max((peak_at(second) - at_first) / (second - first), 1.0)
    room = (capacity - FIXED_OVERHEAD) / FRAGMENTATION - at_first
    low = max(1, first + int(room // slope))
    high, step = low + 1, 1
    while not fits(peak_at(low), capacity):  # batch 1 fits: this ends
        low, high, step = max(1, low - step), low, step * 2
    while fits(peak_at(high), capacity):
        low, high, step = high, high + step, step * 2
    while high - low > 1:  # low fits, high does not
        middle = (low + high) // 2
        low, high = (middle, high) if fits(peak_at(middle), capacity) else (low, middle)
    return low
