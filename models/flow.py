"""Rectified-flow conventions and the training objective.

Conventions owned here (and nowhere else):
* time direction: `t = 0` is data, `t = 1` is noise; `x_t = (1 - t) * x0 + t * eps`;
* velocity target: `v = eps - x0`;
* the network's time input is `t * TIME_SCALE` (the original feeds 0..1000 to the sinusoidal embedding).

Training times follow the original: `u ~ sigmoid(N(0, 1))` (logit-normal), quantised to integer steps
`k = floor(u * TIME_SCALE)` in 0..999; both the interpolation (`k / TIME_SCALE`) and the network input
(`k`) use the quantised value.
"""
from typing import Callable, NamedTuple, Optional

import torch

TIME_SCALE = 1000


class FlowLossOutput(NamedTuple):
    loss: torch.Tensor          # [B] per-sample mean squared error
    timesteps: torch.Tensor     # [B] int64, the quantised times k in 0..TIME_SCALE-1
    x_t: torch.Tensor           # [B, L, C] network input
    prediction: torch.Tensor    # [B, L, C] predicted velocity


def sample_timesteps(batch: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logit-normal(0, 1) times quantised to integers 0..TIME_SCALE-1; returns int64 [B].

    Parity: the original draws the normal variate with scipy on numpy's global RNG; we draw it with torch
    (seedable, per-process), which changes the random stream but not the distribution.
    """
    u = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    return (u * TIME_SCALE).long()


def flow_matching_loss(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                       noise: Optional[torch.Tensor] = None, timesteps: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> FlowLossOutput:
    """Rectified-flow loss of `velocity(x_t, k)` on clean tokens `x0` [B, L, C].

    `velocity` receives the int64 quantised times `k` [B] (the network's ×TIME_SCALE input).
    `noise` [B, L, C] and `timesteps` [B] may be given to fix the random draws; otherwise they are drawn
    from `generator` (noise first, then times, as in the original's call order).
    """
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], x0.device, generator)
    t = (timesteps / TIME_SCALE).to(x0.dtype).view(-1, 1, 1)  # [B, 1, 1]
    x_t = (1 - t) * x0 + t * noise
    prediction = velocity(x_t, timesteps)
    target = noise - x0
    loss = ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2))  # [B]
    return FlowLossOutput(loss, timesteps, x_t, prediction)
