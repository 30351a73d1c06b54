"""util.execution.memory: the structure of a training step's peak memory predicted on fake tensors (ZeRO-1, DDP,
CUDA's kernels, the margin, the largest batch); the checks against real steps are tests/e2e/test_memory_check.py."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from models.transdiff import transdiff_tiny
from util.execution.memory import (
    FIXED_OVERHEAD,
    FRAGMENTATION,
    cuda_kernels,
    fits,
    largest_batch,
    predict_step_memory,
)

TINY = dict(img_size=16, vae_stride=2, vae_embed_dim=12, class_num=3, buffer_size=4)


def tiny(**overrides):
    return lambda: transdiff_tiny(**TINY, **overrides)


def test_zero1_removes_all_but_one_rank_share_of_the_optimizer_state():
    ranks = 8
    plain = predict_step_memory(tiny(), 4, world=ranks)
    sharded = predict_step_memory(tiny(), 4, world=ranks, zero1=True)
    state = plain.at_peak["Optstate"]
    assert plain.peak - sharded.peak == plain.resident - sharded.resident
    assert plain.peak - sharded.peak == pytest.approx(state * (ranks - 1) / ranks, rel=0.02)


def test_ddp_keeps_every_trainable_gradient_between_steps():
    model = tiny()()
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    one = predict_step_memory(tiny(), 4, world=1)
    ranks = predict_step_memory(tiny(), 4, world=2)
    assert ranks.resident - one.resident == gradient_bytes


def test_cuda_kernels_keep_less_than_the_cpus_math_attention_and_float_dropout_masks():
    assert predict_step_memory(tiny(), 4, kernels="cuda").peak < predict_step_memory(tiny(), 4, kernels="cpu").peak


@pytest.mark.parametrize("dtype,masked,kernel", [
    (torch.bfloat16, False, "ScaledDotProductFlashAttentionBackward"),
    (torch.float32, False, "ScaledDotProductEfficientAttentionBackward"),
    (torch.bfloat16, True, "ScaledDotProductEfficientAttentionBackward"),
], ids=["flash-bf16", "efficient-fp32", "efficient-masked-bf16"])
def test_cuda_kernels_pick_attention_as_cuda_does(dtype, masked, kernel):
    with FakeTensorMode(), cuda_kernels():  # fake tensors: the CPU has no flash attention kernel
        q = torch.randn(2, 4, 8, 16, dtype=dtype, requires_grad=True)  # [B, H, L, E]
        mask = torch.ones(1, 1, 8, 8, dtype=torch.bool) if masked else None
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.1)
        dropped = F.dropout(out, 0.1, training=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert type(out.grad_fn).__name__.startswith(kernel)
    assert type(dropped.grad_fn).__name__.startswith("NativeDropoutBackward")


def test_the_cuda_kernels_are_undone_on_exit():
    attention, dropout = F.scaled_dot_product_attention, F.dropout
    with cuda_kernels():
        assert F.scaled_dot_product_attention is not attention and F.dropout is not dropout
    assert F.scaled_dot_product_attention is attention and F.dropout is dropout


def test_zero1_needs_ranks_and_a_prediction_leaves_no_process_group():
    with pytest.raises(ValueError, match="2 or more ranks"):
        predict_step_memory(tiny(), 4, world=1, zero1=True)
    predict_step_memory(tiny(), 2, world=2, zero1=True)
    assert not torch.distributed.is_initialized()


def test_fits_adds_the_margin():
    capacity = 40 * 2 ** 30
    limit = (capacity - FIXED_OVERHEAD) / FRAGMENTATION
    assert fits(int(limit), capacity) and not fits(int(limit) + 1, capacity)


@pytest.mark.parametrize("fixed,per_sample,expected", [(10, 3, 63), (0, 7, 28), (151, 2, 24), (200, 1, 0)])
def test_largest_batch_of_a_linear_peak(fixed, per_sample, expected):
    unit = 2 ** 30
    capacity = int(200 * FRAGMENTATION * unit) + FIXED_OVERHEAD  # room for 200 units with the margin
    calls = []

    def peak_at(batch):
        calls.append(batch)
        return (fixed + per_sample * batch) * unit

    assert largest_batch(peak_at, capacity) == expected
    assert len(calls) <= 5


def test_largest_batch_where_small_batches_grow_slower():
    """With checkpointing the peak of a small batch lies elsewhere in the step and grows more slowly."""
    unit = 2 ** 30
    capacity = int(200 * FRAGMENTATION * unit) + FIXED_OVERHEAD

    def peak_at(batch):
        return max(50 + batch, 3 * batch) * unit  # 3 per sample from batch 25 on

    assert largest_batch(peak_at, capacity) == 66
