"""The diffusion decoder: a PixArt-style transformer that predicts the flow velocity of all image tokens,
cross-attending to the AR transformer's condition tokens.

`DiffusionDecoder` only exists to keep the original's attribute path `diffdecoder.net.*` (checkpoint
keys); the network is `DecoderNet` and the objective lives in `models.flow`.
"""
import math
from typing import List, NamedTuple, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.attention import DecoderBlock, checkpointed

TIME_FREQ_DIM = 256
MAX_PERIOD = 10000


def sinusoidal_frequencies() -> torch.Tensor:
    """[TIME_FREQ_DIM/2] float32 frequencies `exp(-ln(MAX_PERIOD) · i / (TIME_FREQ_DIM/2))`."""
    half = TIME_FREQ_DIM // 2
    exponent = -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32)  # [128]
    return torch.exp(exponent / half)


class TimestepEmbedder(nn.Module):
    """Time features: sinusoid (cos first) of the ×1000 time -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FREQ_DIM, width)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(width, width)
        # A plain attribute, not a buffer: the frequencies must stay float32 when the module is cast to bf16.
        self._freqs = sinusoidal_frequencies()

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] (×1000 scale, any dtype) -> [B, 256] float32 features, cos first."""
        if self._freqs.device != t.device:
            self._freqs = self._freqs.to(t.device)
        angles = t.float()[:, None] * self._freqs[None, :]  # [B, 128]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # [B, 256]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.time_features(t).to(self.linear_1.weight.dtype)  # [B, 256]
        return self.linear_2(self.act(self.linear_1(features)))  # [B, D]


class TimeConditioning(nn.Module):
    """`temb` [B, D] and the six shared block modulations `time_proj(SiLU(temb))` [B, 6, D].

    Parity (fixed, not reproduced): the original rounds SiLU(temb) to bfloat16 before `time_proj`, which
    fails in float32 and moves the velocity by ~2.5e-3; we stay in the ambient dtype.
    """

    def __init__(self, width: int):
        super().__init__()
        self.time_embedder = TimestepEmbedder(width)
        self.act = nn.SiLU()
        self.time_proj = nn.Linear(width, 6 * width)

    def forward(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        temb = self.time_embedder(t)  # [B, D]
        modulation = self.time_proj(self.act(temb)).unflatten(1, (6, -1))  # [B, 6, D]
        return temb, modulation


class FinalLayer(nn.Module):
    """Non-affine LayerNorm modulated by `temb` + a learned table, then a zero-initialised Linear."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, width) / width ** 0.5)
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # Parity: modulated by temb itself (not SiLU(temb), not the block projection).
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # 2 x [B, 1, D]
        return self.linear(self.norm_final(x) * (1 + scale) + shift)  # [B, L, C]


class PreparedCondition(NamedTuple):
    """The per-block cross-attention keys/values of one condition; constant across sampling steps.

    Each key and value is [B, H, Lc, D/H] and depends on its own row of the condition only, so rows can be
    computed once and repeated or gathered to the images that share them (`repeat`, `rows`).
    """
    key_values: List[Tuple[torch.Tensor, torch.Tensor]]

    @property
    def batch(self) -> int:
        return self.key_values[0][0].shape[0]

    def repeat(self, copies: int) -> "PreparedCondition":
        """Row `k·B + b` is row b (the layout of `Tensor.repeat(copies, ...)`); keys/values [copies·B, H, Lc, D/H]."""
        return PreparedCondition([(k.repeat(copies, 1, 1, 1), v.repeat(copies, 1, 1, 1))  # [copies·B, H, Lc, D/H]
                                  for k, v in self.key_values])

    def rows(self, index) -> "PreparedCondition":
        """The rows `index` (an int64 [B'] tensor or a slice); keys/values [B', H, Lc, D/H]."""
        return PreparedCondition([(k[index], v[index]) for k, v in self.key_values])  # [B', H, Lc, D/H]


class DecoderNet(nn.Module):
    """Velocity network `v = net(x_t, c, t)`: x_t [B, N, C] tokens, c [B, Lc, Dc] condition, t [B] ×1000."""

    def __init__(self, in_channels: int, cond_dim: int, width: int, seq_len: int, depth: int, num_heads: int,
                 mlp_ratio: float, norm_layer, attn_drop: float, proj_drop: float,
                 grad_checkpointing: Union[bool, int]):
        super().__init__()
        self.seq_len = seq_len
        self.grad_checkpointing = grad_checkpointing
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, width))
        self.time_embed = TimeConditioning(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([
            DecoderBlock(width, num_heads, mlp_ratio, norm_layer, attn_drop, proj_drop) for _ in range(depth)])
        self.final_layer = FinalLayer(width, in_channels)

    def initialize_weights(self):
        nn.init.normal_(self.diffusion_pos_embed_learned, std=0.02)
        nn.init.normal_(self.time_embed.time_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.time_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def prepare_condition(self, c: torch.Tensor) -> PreparedCondition:
        """c [B, Lc, Dc] -> cross-attention keys/values of every block (compute once per image)."""
        cond = self.cond_embed(c)  # [B, Lc, D]
        return PreparedCondition([block.attn2.key_values(cond) for block in self.res_blocks])

    def forward_prepared(self, x: torch.Tensor, prepared: PreparedCondition, t: torch.Tensor) -> torch.Tensor:
        """Velocity for tokens x [B, N, C] at times t [B] given a prepared condition."""
        if x.shape[1] != self.seq_len:
            raise ValueError(f"decoder expects {self.seq_len} tokens, got {x.shape[1]}")
        temb, modulation = self.time_embed(t)
        h = self.input_proj(x) + self.diffusion_pos_embed_learned  # [B, N, D]
        for index, (block, key_values) in enumerate(zip(self.res_blocks, prepared.key_values)):
            if checkpointed(self.grad_checkpointing, index) and torch.is_grad_enabled():
                h = checkpoint(block, h, key_values, modulation, use_reentrant=False)
            else:
                h = block(h, key_values, modulation)
        return self.final_layer(h, temb)  # [B, N, C]

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The original's signature: velocity for x [B, N, C], condition c [B, Lc, Dc], time t [B] (×1000)."""
        return self.forward_prepared(x, self.prepare_condition(c), t)


class DiffusionDecoder(nn.Module):
    """Holds `net` (checkpoint path `diffdecoder.net`)."""

    def __init__(self, **net_kwargs):
        super().__init__()
        self.net = DecoderNet(**net_kwargs)

