"""Which library computes the model's float32 linear layers on CPU (`--linear_backend`).

* ``aten`` (default): `torch.nn.Linear` as it is: ATen's BLAS, Intel MKL in the official wheels. This is the
  original's arithmetic, bit for bit.
* ``onednn``: the forward product and both backward products through oneDNN
  (`torch.ops.mkldnn._linear_pointwise`), float32 in and out, float32 accumulation. oneDNN chooses its kernels
  by the instruction sets the CPU reports; MKL chooses by vendor and runs its AVX2 kernels on AMD CPUs. On an
  AMD EPYC with AVX-512 (Zen 5) a TransDiff-B sized product runs at about 100 GFLOP/s in MKL and 160-220 GFLOP/s
  in oneDNN on one thread. Results differ from MKL's by the summation order (about 1e-6 relative). IPEX's
  `ipex.optimize` makes the same substitution for float32 CPU training.
* ``auto`` (a choice of the flag, `resolve_linear_backend`): ``onednn`` on a CPU with AVX-512, ``aten`` elsewhere.
  On AVX2 CPUs both libraries run AVX2 code at about the same speed forward, and oneDNN's backward products are
  slower (24-44 GFLOP/s against MKL's 43-59 on this project's AVX2 machine).

The switch changes the class of the model's `nn.Linear` instances in place (`OneDNNLinear` is a subclass with the
same parameters), so state dicts, checkpoints and optimizers are unaffected. Layers fall back to `nn.Linear` for
anything but float32 on CPU, and under autocast (whose bfloat16 products already run in oneDNN). Set the backend
before `torch.compile` traces the model (`util.execution.compile_blocks`); the op is opaque to inductor, which
calls it as an external kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

LINEAR_BACKENDS = ("aten", "onednn")
LINEAR_BACKEND_CHOICES = (*LINEAR_BACKENDS, "auto")  # auto: `resolve_linear_backend`


@torch.library.custom_op("transdiff::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] times weight [N, K] transposed, plus bias [N] -> [M, N], in oneDNN; inputs of any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])  # [M, N]


@torch.library.custom_op("transdiff::onednn_linear_grads", mutates_args=())
def onednn_linear_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, x_grad: bool,
                        weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `onednn_linear`'s x [M, K] and weight [N, K] from grad [M, N], in oneDNN; an empty tensor
    for a gradient not asked for.

    An op of its own, so that the compiler sees neither the transposed operands (it would copy them, and keep
    the copies from the forward pass) nor the products.
    """
    grad_x = (torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "") if x_grad
              else grad.new_empty(0))  # [M, K]
    grad_weight = (torch.ops.mkldnn._linear_pointwise(grad.t(), x.t(), None, "none", [], "") if weight_grad
                   else grad.new_empty(0))  # [N, K]
    return grad_x, grad_weight


@onednn_linear_grads.register_fake
def _onednn_linear_grads_fake(grad, x, weight, x_grad, weight_grad):
    return (x.new_empty(x.shape if x_grad else (0,)), weight.new_empty(weight.shape if weight_grad else (0,)))


def _save_for_backward(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad):
    """grad [M, N] -> gradients of x [M, K], weight [N, K] and bias [N] (None where not needed)."""
    x, weight = ctx.saved_tensors
    x_grad, weight_grad, bias_grad = ctx.needs_input_grad
    grad_x, grad_weight = onednn_linear_grads(grad, x, weight, x_grad, weight_grad)
    return (grad_x if x_grad else None, grad_weight if weight_grad else None,
            grad.sum(0) if ctx.has_bias and bias_grad else None)


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_save_for_backward)


def linear_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   backend: str) -> torch.Tensor:
    """x [M, K] times weight [N, K] transposed, plus bias [N] -> [M, N], as `backend`'s layers compute it."""
    return onednn_linear(x, weight, bias) if backend == "onednn" else F.linear(x, weight, bias)


def linear_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, x_grad: bool, weight_grad: bool,
                 backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `linear_product`'s x [M, K] and weight [N, K] from grad [M, N] (an empty tensor for one
    not asked for), bit for bit as `backend`'s layers compute them: for aten, autograd's formulas for
    `F.linear` (grad·weight and gradᵀ·x)."""
    if backend == "onednn":
        return onednn_linear_grads(grad, x, weight, x_grad, weight_grad)
    return (grad.mm(weight) if x_grad else grad.new_empty(0),  # [M, K]
            grad.t().mm(x) if weight_grad else grad.new_empty(0))  # [N, K]


def float32_cpu_backend(layer: nn.Linear, x: torch.Tensor) -> Optional[str]:
    """The backend (`LINEAR_BACKENDS`) whose products `layer` computes `x` with, where that is a float32 CPU
    product (`linear_product`): float32 input and weight on CPU, outside autocast, not empty; else None."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or x.numel() == 0):
        return None
    return "onednn" if isinstance(layer, OneDNNLinear) else "aten"


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose float32 CPU products run in oneDNN; anything else runs as `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float32_cpu_backend(self, x) is None:
            return super().forward(x)
        out = onednn_linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # [M, N]
        return out.view(*x.shape[:-1], self.out_features)  # [..., N]


def check_linear_backend(backend: str, device_type: Optional[str] = None) -> None:
    """Raise ValueError, saying what to use instead, for an unknown backend, ``onednn`` on a torch built without
    oneDNN, or ``onednn`` for a run on another device than the CPU (when `device_type` is given)."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; choose one of {', '.join(LINEAR_BACKENDS)}")
    if backend != "onednn":
        return
    if device_type is not None and device_type != "cpu":
        raise ValueError(f"--linear_backend onednn is for CPU runs (this run is on {device_type}); "
                         "leave it at aten (on CUDA, --tf32 is the faster float32)")
    if not torch.backends.mkldnn.is_available():
        raise ValueError("--linear_backend onednn: this torch build has no oneDNN; use aten")


def resolve_linear_backend(choice: str, device_type: str = "cpu") -> str:
    """One of `LINEAR_BACKENDS` for a `LINEAR_BACKEND_CHOICES` entry. ``auto`` is ``onednn`` on a CPU with AVX-512
    (where MKL may run AVX2 code: AMD) and a torch with oneDNN, else ``aten``: on AVX2 CPUs oneDNN's float32
    products are no faster than MKL's, and its backward products slower (a TransDiff-B decoder block's training
    step took 12 % longer on this project's AVX2 machine)."""
    if choice != "auto":
        return choice
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "onednn" if device_type == "cpu" and avx512 and torch.backends.mkldnn.is_available() else "aten"


def set_linear_backend(model: nn.Module, backend: str) -> int:
    """Run every `nn.Linear` of `model` through `backend` (one of `LINEAR_BACKENDS`); returns how many layers.

    Raises ValueError as `check_linear_backend` does.
    """
    check_linear_backend(backend)
    target = OneDNNLinear if backend == "onednn" else nn.Linear
    layers = [module for module in model.modules() if type(module) in (nn.Linear, OneDNNLinear)]
    for layer in layers:
        layer.__class__ = target
    return len(layers)
