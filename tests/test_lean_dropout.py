"""models.lean_dropout (`--lean_dropout`): dropout and attention with dropout that keep only their masks.

They must be torch's `F.dropout` and the math path of `F.scaled_dot_product_attention` bit for bit, forward and
gradients, with the same draws from torch's generator, and keep far fewer bytes for the backward pass.
"""
import pytest
import torch
import torch.nn.functional as F

from models.lean_dropout import LeanDropout, dropout, dropout_attention, set_lean_dropout
from models.transdiff import block_causal_mask
from tiny_runs import LABELS, loss_and_grads, tiny_model


def qkv(queries, keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, queries, 8, generator=g)
    k, v = torch.randn(2, 3, keys, 8, generator=g), torch.randn(2, 3, keys, 8, generator=g)
    return [t.requires_grad_(True) for t in (q, k, v)]


def run_attention(lean, queries, keys, mask, saved_bytes=None):
    q, k, v = qkv(queries, keys)
    torch.manual_seed(3)  # the dropout draws

    def pack(tensor):
        if saved_bytes is not None:
            saved_bytes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = (dropout_attention(q, k, v, mask, 0.25)[0] if lean
               else F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25))
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("queries,keys,masked", [(12, 12, False), (10, 7, False), (12, 12, True)])
def test_bit_identical_to_the_math_path_forward_and_gradients(queries, keys, masked):
    mask = block_causal_mask([4, 4, 4])[:, :, :queries, :keys] if masked else None  # [1, 1, L, S], a slice
    sdpa, lean = run_attention(False, queries, keys, mask), run_attention(True, queries, keys, mask)
    for name, a, b in zip(("output", "q", "k", "v"), sdpa, lean):
        assert torch.equal(a, b), name


def test_keeps_the_mask_not_the_weights():
    sdpa, lean = {}, {}
    run_attention(False, 64, 64, None, sdpa)
    run_attention(True, 64, 64, None, lean)
    weights, inputs = 2 * 3 * 64 * 64, 3 * 2 * 3 * 64 * 8 * 4  # attention weights; bytes of q, k and v
    assert sum(sdpa.values()) >= 3 * 4 * weights  # softmax output, noise, dropped weights: float32 each
    assert sum(lean.values()) == inputs + weights  # q, k, v and a bool mask


def saved_bytes_and_results(lean, x, p, saved):
    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = dropout(x, p)[0] if lean else F.dropout(x, p)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
    return out, x.grad


@pytest.mark.parametrize("transposed", [False, True])
def test_dropout_is_torchs_bit_for_bit_and_keeps_a_bool_mask(transposed):
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    x = x.t() if transposed else x  # strides are kept
    saved_torch, saved_lean = {}, {}
    out_torch, grad_torch = saved_bytes_and_results(False, x, 0.3, saved_torch)
    out_lean, grad_lean = saved_bytes_and_results(True, x, 0.3, saved_lean)
    assert torch.equal(out_lean, out_torch) and out_lean.stride() == out_torch.stride()
    assert torch.equal(grad_lean, grad_torch)
    assert sum(saved_torch.values()) == 4 * x.numel() and sum(saved_lean.values()) == x.numel()


def tiny(mrar=False, grad_checkpointing=False, lean=False):
    model = tiny_model(mrar, grad_checkpointing, attn_dropout=0.2, proj_dropout=0.1)
    attentions = len(model.encoder_blocks) + 2 * len(model.diffdecoder.net.res_blocks)
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    assert set_lean_dropout(model, lean) == attentions + len(dropouts)
    assert all(isinstance(module, LeanDropout) == lean for module in dropouts)
    return model


def loss_grads_and_calls(model):
    with torch.profiler.profile() as profile:
        loss, grads = loss_and_grads(model)
    calls = {name: sum(event.name == f"transdiff::{name}" for event in profile.events())
             for name in ("dropout_attention", "dropout")}
    return loss, grads, calls


@pytest.mark.parametrize("mrar,grad_checkpointing", [(False, False), (True, False), (False, True)])
def test_lean_training_step_is_bit_identical(mrar, grad_checkpointing):
    loss_ref, grads_ref, calls_ref = loss_grads_and_calls(tiny(mrar, grad_checkpointing))
    model = tiny(mrar, grad_checkpointing, lean=True)
    loss, grads, calls = loss_grads_and_calls(model)
    blocks = len(model.encoder_blocks), len(model.diffdecoder.net.res_blocks) * model.num_stages
    runs = 2 if grad_checkpointing else 1  # checkpointing recomputes
    assert calls_ref == {"dropout_attention": 0, "dropout": 0}
    assert calls == {"dropout_attention": (blocks[0] + 2 * blocks[1]) * runs,  # self- (and cross-) attention
                     "dropout": (3 * blocks[0] + 4 * blocks[1]) * runs}  # attention outputs and the MLP's two
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert torch.equal(grads[name], grad), name


def test_sampling_and_bf16_use_torchs_dropout_and_attention():
    model = tiny(lean=True).eval()
    with torch.profiler.profile() as profile:
        model.samples(LABELS, 2, cfg=1.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.train()(torch.randn(len(LABELS), 4, 8, 8), LABELS).backward()
    assert not any(event.name.startswith("transdiff::") for event in profile.events())
