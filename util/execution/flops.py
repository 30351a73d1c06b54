"""Model FLOPs, counted by torch's flop counter on a meta-device model, and model FLOPs utilisation (MFU).

A training image's FLOPs are those of TransDiff's forward and backward pass (the encoder, the decoder over the
`diffusion_batch_mul` copies, the loss), counted once per run on a copy built on the meta device, so no memory is
allocated and nothing runs: `training_flops_per_image`. The tokenizer's encode is not model FLOPs, as MFU is
reckoned in the literature. The peak is looked up for known GPUs (`PEAK_TFLOPS`, dense tensor-core figures of
the vendor's data sheets) or given with `--peak_tflops`; on a CPU, or an unknown GPU, only the achieved FLOP/s is
reported.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peak TFLOP/s by GPU family (the SXM parts; H100 PCIe is lower), for each precision a run can have:
# bf16 and fp16 autocast, fp32 with --tf32, plain fp32.
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
}


def training_flops_per_image(build_model: Callable[[], torch.nn.Module], batch: int = 2) -> float:
    """FLOPs of one training image (forward and backward) of the model `build_model()` builds, counted on the
    meta device with a batch of `batch` class-0 images of random latents."""
    with torch.device("meta"):
        model = build_model().train()
        shape = (batch, model.vae_embed_dim, model.latent_size, model.latent_size)
        latents = [torch.randn(shape) for _ in range(model.num_stages)] if model.mrar else torch.randn(shape)
        labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(latents, labels).backward()
    return counter.get_total_flops() / batch


def peak_flops(device: torch.device, precision: str, tf32: bool, peak_tflops: Optional[float] = None
               ) -> Optional[float]:
    """The device's peak FLOP/s at the run's precision: `peak_tflops` when given, else a known GPU's; None on a
    CPU or an unknown GPU (then only the achieved FLOP/s is meaningful)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32 else precision
    for family, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if family in name:
            return peaks[key] * 1e12
    return None


class Throughput(NamedTuple):
    """Images per second of one process over a window of steps, with the model FLOP/s they mean."""

    images_per_second: float
    flops_per_second: float
    mfu: Optional[float]  # achieved / peak, None without a known peak

    @classmethod
    def of(cls, images: int, seconds: float, flops_per_image: float, peak: Optional[float]) -> Throughput:
        rate = images / seconds if seconds > 0 else float("nan")
        flops = rate * flops_per_image
        return cls(rate, flops, flops / peak if peak else None)


def sampling_flops_per_image(build_model: Callable[[], torch.nn.Module], guided: bool = True,
                             batch: int = 2) -> tuple[float, float]:
    """FLOPs per image of sampling a model's first stage, counted on the meta device: `(once, per_step)`, the
    condition (the encoder and every block's cross-attention keys/values) and one velocity evaluation, both with
    the unconditional branch when `guided` (the rows `[cond; uncond]`). An image of N steps costs about
    `once + N * per_step` (MRAR: per stage, its later stages' encoder reading more tokens)."""
    with torch.device("meta"):
        model = build_model().eval()
        rows = 2 * batch if guided else batch
        embedding = torch.zeros(rows, model.fake_latent.shape[1])  # [B', D]
        tokens = torch.zeros(rows, model.tokens_per_stage, model.token_embed_dim) if model.mrar else None
        x = torch.zeros(rows, model.diff_seqlen, model.decoder_token_dim)  # [B', N, C]
        t = torch.zeros(rows)  # [B']
    net = model.diffdecoder.net
    with torch.no_grad(), FlopCounterMode(display=False) as condition:
        prepared = net.prepare_condition(model.forward_encoder(tokens, embedding))
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        net.forward_prepared(x, prepared, t)
    return condition.get_total_flops() / batch, step.get_total_flops() / batch
