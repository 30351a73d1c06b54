"""Optimizer, weight-decay groups, EMA and gradient scaler as used by TransDiff training."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from util.distributed import is_initialized, is_main_process, print0

ADAMW_BETAS = (0.9, 0.95)
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              skip_list: Iterable[str] = ()) -> tuple[list[dict], str]:
    """Split trainable parameters into a no-decay and a decay group: ``(groups, summary)``.

    No weight decay for 1-D tensors (norm weights, biases), names ending in ``.bias``, names in
    ``skip_list``, and every parameter whose name contains ``diffdecoder``; the position embeddings,
    ``mask_token`` and ``fake_latent`` are not 1-D and are decayed, as in the original. Parameters
    with ``requires_grad=False`` are left out.

    Parity: this is MAR's ``add_weight_decay`` with TransDiff's extra rule that the whole diffusion
    decoder is not decayed. The group order (no-decay first) is kept so optimizer states saved by
    the original map onto the same parameters; both groups exist even when one is empty.
    """
    skip = set(skip_list)
    decay, no_decay = [], []
    decay_numel = no_decay_numel = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias") or name in skip or "diffdecoder" in name:
            no_decay.append(param)
            no_decay_numel += param.numel()
        else:
            decay.append(param)
            decay_numel += param.numel()
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    summary = (f"weight decay {weight_decay} on {len(decay)} tensors ({decay_numel:,} params); "
               f"none on {len(no_decay)} tensors ({no_decay_numel:,} params)")
    return groups, summary


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    skip_list: Iterable[str] = (), device_type: str = "cpu",
                    shard_state: bool = False) -> torch.optim.Optimizer:
    """AdamW with betas (0.9, 0.95) over :func:`param_groups_weight_decay`; prints the grouping on rank 0.

    The update runs as one fused kernel per parameter group on CUDA and CPU (multi-tensor foreach operations
    elsewhere): the same AdamW in one pass over the weights, without the original per-parameter loop's
    temporaries (the last bits may differ from it).

    `shard_state` (`--zero1`, with a process group): torch's ZeroRedundancyOptimizer around the same AdamW. Each
    rank keeps the moments of its share of the parameters, steps them, and broadcasts them: the same update,
    with 1/world of the optimizer state per rank. Its consolidated `state_dict` (`consolidate_state_dict` on
    every rank first) has AdamW's format, so checkpoints do not depend on it.
    """
    groups, summary = param_groups_weight_decay(model, weight_decay, skip_list)
    implementation = {"fused": True} if device_type in FUSED_ADAMW_DEVICES else {"foreach": True}
    sharded = shard_state and is_initialized()
    print0(f"optimizer: AdamW ({next(iter(implementation))}{', ZeRO-1' if sharded else ''}) lr {lr:.3g} "
           f"betas {ADAMW_BETAS}; {summary}")
    if sharded:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=ADAMW_BETAS,
                                       **implementation)
    return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, **implementation)


def full_state_dict(optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's whole state in AdamW's format, on rank 0 (None elsewhere). A collective for a sharded
    optimizer: every rank calls it."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if is_main_process() else None


class EMA:
    """Exponential moving average of all model parameters, held in a float32 copy of the model.

    In training the model is float32 (``--bf16`` is bf16 autocast: weights, optimizer state and this
    average all stay float32). The copy is float32 whatever the model's dtype, since with a decay of
    0.9999 each update moves a weight by 1e-4 of the gap, below bfloat16's 8-bit mantissa resolution:
    a bfloat16 average would stop moving. Every parameter is averaged, trainable or not, as in the
    original. Pass the bare module, not its DDP wrapper, so names match.
    """

    def __init__(self, model: torch.nn.Module):
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * param`` for every parameter, matched by name.

        Multi-tensor (foreach) operations: the same multiply and add as the original's per-parameter loop, bit
        for bit, with fewer kernel launches.
        """
        params = dict(model.named_parameters())
        ema_params, sources = zip(*[(ema_param, params[name].detach())
                                    for name, ema_param in self.module.named_parameters()])
        torch._foreach_mul_(ema_params, decay)
        torch._foreach_add_(ema_params, sources, alpha=1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's state-dict keys (saved as ``'model_ema'``)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load averaged weights (cast to float32), strictly."""
        self.module.load_state_dict(state_dict, strict=True)


def build_grad_scaler(enabled: bool, device_type: str) -> torch.amp.GradScaler:
    """Loss scaler for float16 autocast; pass ``enabled=False`` for bfloat16 or float32 training."""
    return torch.amp.GradScaler(device_type, enabled=enabled)
