"""Attention blocks shared by the AR transformer (encoder) and the diffusion decoder.

Attribute names (`qkv`, `proj`, `wq`/`wk`/`wv`, `fc1`/`fc2`, `norm1..3`, `scale_shift_table`) are fixed by
the original checkpoints and must not change.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           dropout_p: float) -> torch.Tensor:
    """softmax(q kᵀ/sqrt(E)) v with dropout: q [B, H, L, E], k, v [B, H, S, E] -> [B, H, L, E]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def checkpointed(grad_checkpointing: Union[bool, int], index: int) -> bool:
    """Whether block `index` of a stack recomputes its activations in the backward pass: every block for True,
    the first N for an int N, none for False or 0 (`--grad_checkpointing [N]`)."""
    if isinstance(grad_checkpointing, bool):
        return grad_checkpointing
    return index < grad_checkpointing


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, D] -> [B, H, L, D/H]."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # [B, H, L, D/H]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D/H] -> [B, L, D]."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)  # [B, L, D]


class Mlp(nn.Module):
    """Linear -> exact GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)  # [..., F]
        return self.drop(self.fc2(self.drop(self.act(hidden))))  # [..., D]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, L, D]; mask: bool [1, 1, L, L], True where a query may attend to a key."""
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads)  # [B, L, 3, H, D/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D/H]
        out = attend(q, k, v, mask, self.attn_drop if self.training else 0.0)  # [B, H, L, D/H]
        return self.proj_drop(self.proj(merge_heads(out)))  # [B, L, D]


class CrossAttention(nn.Module):
    """Queries from the tokens, keys/values from the condition.

    `key_values(cond)` is split out so that it is computed once per condition (`DecoderNet.prepare_condition`):
    the condition does not change across the diffusion steps, nor across a sample's training copies.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def key_values(self, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """cond [B, Lc, D] -> keys, values, each [B, H, Lc, D/H]."""
        return split_heads(self.wk(cond), self.num_heads), split_heads(self.wv(cond), self.num_heads)

    def forward(self, x: torch.Tensor, key_values: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, D] attends to precomputed `key_values` of a condition with the same batch size."""
        keys, values = key_values
        if keys.shape[0] != x.shape[0]:
            raise ValueError(f"condition batch {keys.shape[0]} does not match token batch {x.shape[0]}")
        q = split_heads(self.wq(x), self.num_heads)  # [B, H, L, D/H]
        out = attend(q, keys, values, None, self.attn_drop if self.training else 0.0)  # [B, H, L, D/H]
        return self.proj_drop(self.proj(merge_heads(out)))  # [B, L, D]


class EncoderBlock(nn.Module):
    """Pre-norm ViT block of the AR transformer (the original's `AttentionBlock`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer, attn_drop: float,
                 proj_drop: float):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Diffusion-decoder block (the original's `CrossAttentionBlock`, PixArt-style adaLN-single).

    The six modulation vectors are the shared timestep projection plus this block's learned
    `scale_shift_table`. Self-attention and MLP are modulated and gated; cross-attention is not.
    Parity: the original names the MLP terms `c_shift/c_scale/c_gate`; they modulate the MLP, not the
    cross-attention.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer, attn_drop: float,
                 proj_drop: float):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.norm1 = norm_layer(dim)
        self.attn1 = SelfAttention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.attn2 = CrossAttention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm3 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, cond_key_values: Tuple[torch.Tensor, torch.Tensor],
                modulation: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; modulation [B, 6, D] (shared timestep projection)."""
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table + modulation).chunk(6, dim=1)  # 6 x [B, 1, D]
        x = x + self.attn1(self.norm1(x) * (1 + scale_attn) + shift_attn) * gate_attn
        x = x + self.attn2(self.norm2(x), cond_key_values)
        return x + self.mlp(self.norm3(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp
