"""Numerical precision of a run, decided once: the autocast dtype, the grad scaler, the VAE decode's dtype, and
the CUDA backends' float32 settings.

`resolve_precision` turns `--precision auto` into a concrete value in the settings step (`util.settings`), so
everything later (the autocast context, the grad scaler, the evaluation record) reads one word:

* ``fp32``: no autocast (CPU, MPS, and CUDA GPUs without native bfloat16 unless asked otherwise);
* ``bf16``: bfloat16 autocast; weights, optimizer state and the EMA stay float32. `auto` on a GPU with native
  bfloat16 (Ampere and newer);
* ``fp16``: float16 autocast with a grad scaler, only when asked: the original's default on CUDA, where its
  users report NaNs.

The VAE decode never runs in float16: its activations overflow at large latents, so under ``fp16`` it decodes in
float32 (`decode_precision`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch

from models.tokenizers import decode_from_latents

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Images per VAE decode call: the decoder's full-resolution activations grow with the batch and dominate an
# evaluation's memory at --eval_bsz 256 (docs/gpu.md), so a batch is decoded in slices of this many.
DECODE_CHUNK = 32
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device_type: str) -> bool:
    """Whether `device_type`'s current device computes bfloat16 natively (CUDA: Ampere and newer)."""
    return device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str, device_type: str) -> str:
    """`--precision` as one of fp32 / bf16 / fp16: ``auto`` is bf16 on a CUDA GPU with native bfloat16, fp32
    elsewhere; an explicit choice is kept."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return "bf16" if native_bf16(device_type) else "fp32"


def autocast_context(precision: str, device_type: str) -> Callable[[], ContextManager]:
    """A factory of the autocast contexts of a resolved `precision` (a null context for fp32)."""
    if precision == "fp32":
        return nullcontext
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device_type, dtype=dtype)


def uses_grad_scaler(precision: str) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 need none."""
    return precision == "fp16"


def decode_precision(precision: str) -> str:
    """The VAE decode's precision: bf16 under bf16, float32 otherwise (never float16)."""
    return "bf16" if precision == "bf16" else "fp32"


def decode_images(tokenizer, latents: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1], `DECODE_CHUNK` at a time, in the decode precision
    (`decode_precision`: never float16)."""
    in_bf16 = decode_precision(precision) == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=in_bf16):  # off also inside a sampling context
        return torch.cat([decode_from_latents(tokenizer, part) for part in latents.split(DECODE_CHUNK)])


def configure_cuda_backends(tf32: bool) -> None:
    """`--tf32` allows TF32 for float32 matrix products only; cuDNN's convolutions keep PyTorch's default (TF32
    allowed, as MAR and the original run them), and cuDNN picks its fastest kernels for the fixed shapes of
    training and evaluation (`cudnn.benchmark`)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
