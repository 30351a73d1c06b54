"""Dropout that keeps only its mask for the backward pass (`--lean_dropout`), in CPU float32 training.

On CPU, torch's dropout keeps its float32 noise for the backward pass (4 bytes per element), and
`F.scaled_dot_product_attention` with dropout runs its math path, which keeps, for every attention weight, the
softmax output, the noise and the dropped weights (12 bytes), besides scaled copies of the queries and keys.
The ops here compute the same forwards, op for op (the same values and the same draws from torch's generator,
made by `models.bernoulli_draws`), but keep the mask as bool (1 byte per element):

* `dropout`: x times the noise; the backward multiplies by the noise rebuilt from the mask.
* `dropout_attention`: keeps q, k, v and the mask; its backward recomputes the weights from q and k, as flash
  attention does on GPUs.
* `gelu_dropout_linear`: the MLP's GELU -> dropout -> second linear layer, with that layer's products
  (`models.linear_backend`). Unfused, the GELU keeps its input and the linear layer keeps its own input (the
  dropped activation): two float32 copies of the hidden layer. This op keeps the GELU's input and the mask, and
  its backward recomputes the dropped activation (a GELU and a product, elementwise).

Forwards and gradients are bit-identical to torch's (`tests/test_lean_dropout.py`). At TransDiff-B, batch 2 x
`diffusion_batch_mul` 4, this keeps several GiB less, for one extra q·kᵀ product per attention and one GELU per
MLP in the backward. The ops are opaque to `torch.compile`, so that the compiler cannot merge a backward's
recomputation with the forward and keep what it recomputes after all.

Shapes: B batch, H heads, L queries, S keys, E head width; in the MLP, M rows of hidden width F and output
width D.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bernoulli_draws import dropout_draws
from models.linear_backend import float32_cpu_backend, linear_grads, linear_product


def _attention_weights(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, float]:
    """softmax(q kᵀ / sqrt(E)) [B, H, L, S], the math path's way: q and k each scaled by E^-1/4, a bool `mask`
    (True: may attend) as an additive -inf; returns the weights and that scale."""
    root_scale = math.sqrt(q.shape[-1] ** -0.5)
    scores = (q * root_scale) @ (k * root_scale).transpose(-2, -1)  # [B, H, L, S]
    if mask is None:  # no row is all -inf: the safe softmax's values, without its checks
        return torch.softmax(scores, -1), root_scale
    scores = scores + torch.zeros_like(mask, dtype=scores.dtype).masked_fill_(mask.logical_not(), float("-inf"))
    return torch._safe_softmax(scores, -1), root_scale


def _noise_from_mask(kept: torch.Tensor, dtype: torch.dtype, p: float) -> torch.Tensor:
    """The noise of `dropout_draws` rebuilt from its bool mask, value for value."""
    return kept.to(dtype).div_(1 - p)


@torch.library.custom_op("transdiff::dropout_attention", mutates_args=())
def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, L, E] and the kept weights (bool [B, H, L, S]) of q [B, H, L, E], k, v [B, H, S, E]."""
    weights, _ = _attention_weights(q, k, mask)
    noise, kept = dropout_draws(weights, dropout_p)  # [B, H, L, S]
    return (weights * noise) @ v, kept


@dropout_attention.register_fake
def _dropout_attention_fake(q, k, v, mask, dropout_p):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(*q.shape[:-1], k.shape[-2], dtype=torch.bool)


@torch.library.custom_op("transdiff::dropout_attention_backward", mutates_args=())
def dropout_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: Optional[torch.Tensor], kept: torch.Tensor,
                               dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v from the output's `grad` [B, H, L, E], the weights recomputed (autograd's formulas)."""
    weights, root_scale = _attention_weights(q, k, mask)  # [B, H, L, S]
    noise = _noise_from_mask(kept, weights.dtype, dropout_p)  # [B, H, L, S]
    grad_v = (weights * noise).transpose(-2, -1) @ grad  # [B, H, S, E]
    grad_weights = (grad @ v.transpose(-2, -1)).mul_(noise)  # [B, H, L, S]
    grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)  # [B, H, L, S]
    grad_q = (grad_scores @ (k * root_scale)).mul_(root_scale)  # [B, H, L, E]
    grad_k = (q * root_scale).transpose(-2, -1).matmul(grad_scores).transpose(-2, -1).mul(root_scale)  # [B, H, S, E]
    return grad_q, grad_k.contiguous(), grad_v


@dropout_attention_backward.register_fake
def _dropout_attention_backward_fake(grad, q, k, v, mask, kept, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


def _save_for_backward(ctx, inputs, output):
    q, k, v, mask, dropout_p = inputs
    ctx.save_for_backward(q, k, v, mask, output[1])
    ctx.dropout_p = dropout_p


def _backward(ctx, grad, grad_kept):
    q, k, v, mask, kept = ctx.saved_tensors
    return (*dropout_attention_backward(grad, q, k, v, mask, kept, ctx.dropout_p), None, None)


dropout_attention.register_autograd(_backward, setup_context=_save_for_backward)


@torch.library.custom_op("transdiff::dropout", mutates_args=())
def dropout(x: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """`F.dropout(x, p)` in training, and its mask (bool, x's shape)."""
    noise, kept = dropout_draws(x, p)
    return x * noise, kept


@dropout.register_fake
def _dropout_fake(x, p):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _save_mask(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.p = inputs[1]


def _dropout_backward(ctx, grad, grad_kept):
    (kept,) = ctx.saved_tensors
    return grad * _noise_from_mask(kept, grad.dtype, ctx.p), None


dropout.register_autograd(_dropout_backward, setup_context=_save_mask)


@torch.library.custom_op("transdiff::gelu_dropout_linear", mutates_args=())
def gelu_dropout_linear(hidden: torch.Tensor, p: float, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """`linear(F.dropout(F.gelu(hidden), p), weight, bias)` with `backend`'s products, hidden [..., F],
    weight [D, F] -> [M, D] (M rows: hidden flattened), and the dropout mask (bool [..., F])."""
    activated = F.gelu(hidden)  # [..., F]
    noise, kept = dropout_draws(activated, p)
    dropped = (activated * noise).reshape(-1, hidden.shape[-1])  # [M, F]
    return linear_product(dropped, weight, bias, backend), kept


@gelu_dropout_linear.register_fake
def _gelu_dropout_linear_fake(hidden, p, weight, bias, backend):
    return hidden.new_empty(hidden.numel() // hidden.shape[-1], weight.shape[0]), torch.empty_like(hidden,
                                                                                                    dtype=torch.bool)


@torch.library.custom_op("transdiff::gelu_dropout_linear_backward", mutates_args=())
def gelu_dropout_linear_backward(grad: torch.Tensor, hidden: torch.Tensor, kept: torch.Tensor,
                                 weight: torch.Tensor, p: float, backend: str, hidden_grad: bool,
                                 weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `gelu_dropout_linear`'s hidden [..., F] and weight [D, F] from grad [M, D], the dropped
    activation recomputed (autograd's formulas); an empty tensor for a gradient not asked for."""
    noise = _noise_from_mask(kept, hidden.dtype, p)  # [..., F]
    dropped = (F.gelu(hidden) * noise).reshape(-1, hidden.shape[-1])  # [M, F]
    grad_dropped, grad_weight = linear_grads(grad, dropped, weight, hidden_grad, weight_grad, backend)  # [M, F]
    if not hidden_grad:
        return grad_dropped, grad_weight
    grad_activated = grad_dropped.view(hidden.shape) * noise  # [..., F]
    return torch.ops.aten.gelu_backward(grad_activated, hidden), grad_weight


@gelu_dropout_linear_backward.register_fake
def _gelu_dropout_linear_backward_fake(grad, hidden, kept, weight, p, backend, hidden_grad, weight_grad):
    return (hidden.new_empty(hidden.shape if hidden_grad else (0,)),
            weight.new_empty(weight.shape if weight_grad else (0,)))


def _save_hidden(ctx, inputs, output):
    hidden, p, weight, bias, backend = inputs
    ctx.save_for_backward(hidden, output[1], weight)
    ctx.p, ctx.backend, ctx.has_bias = p, backend, bias is not None


def _gelu_dropout_linear_backward(ctx, grad, grad_kept):
    hidden, kept, weight = ctx.saved_tensors
    hidden_grad, _, weight_grad, bias_grad, _ = ctx.needs_input_grad
    grad_hidden, grad_weight = gelu_dropout_linear_backward(grad, hidden, kept, weight, ctx.p, ctx.backend,
                                                            hidden_grad, weight_grad)
    return (grad_hidden if hidden_grad else None, None, grad_weight if weight_grad else None,
            grad.sum(0) if ctx.has_bias and bias_grad else None, None)


gelu_dropout_linear.register_autograd(_gelu_dropout_linear_backward, setup_context=_save_hidden)


def applies(x: torch.Tensor, p: float) -> bool:
    """Where the lean ops change anything: float32 CPU training with dropout (CUDA's fused kernels already keep
    masks; inference keeps nothing)."""
    return 0.0 < p < 1.0 and x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()


def mlp_fusion_backend(hidden: torch.Tensor, p: float, output_layer: nn.Linear) -> Optional[str]:
    """The linear backend with which `mlp_output` computes an MLP's GELU -> dropout -> `output_layer` for
    `hidden`: where the lean ops apply and the layer computes `hidden` with float32 CPU products; else None."""
    return float32_cpu_backend(output_layer, hidden) if applies(hidden, p) else None


def mlp_output(hidden: torch.Tensor, p: float, output_layer: nn.Linear, backend: str) -> torch.Tensor:
    """`output_layer(F.dropout(F.gelu(hidden), p))` [..., D] of hidden [..., F] by `gelu_dropout_linear`, which
    keeps hidden and the mask; `backend` is `mlp_fusion_backend`'s answer."""
    out = gelu_dropout_linear(hidden, p, output_layer.weight, output_layer.bias, backend)[0]  # [M, D]
    return out.view(*hidden.shape[:-1], output_layer.out_features)  # [..., D]


class LeanDropout(nn.Dropout):
    """`nn.Dropout` that keeps its mask as bool where `applies`; elsewhere `nn.Dropout` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.inplace and applies(x, self.p):
            return dropout(x, self.p)[0]
        return super().forward(x)


def set_lean_dropout(model: nn.Module, enabled: bool) -> int:
    """Switch every dropout of `model`: its `nn.Dropout` layers (their class) and its attentions and MLPs (modules
    with a `lean_dropout` attribute). Parameters and state dict are unchanged. Returns how many were switched."""
    dropouts = [module for module in model.modules() if type(module) in (nn.Dropout, LeanDropout)]
    for layer in dropouts:
        layer.__class__ = LeanDropout if enabled else nn.Dropout
    attentions = [module for module in model.modules() if hasattr(module, "lean_dropout")]
    for attention in attentions:
        attention.lean_dropout = enabled
    return len(dropouts) + len(attentions)
