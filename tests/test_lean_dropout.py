"""models.lean_dropout (`--lean_dropout`): dropout, attention with dropout and the MLP's GELU -> dropout ->
linear that keep only their masks (and, in the MLP, the GELU's input).

They must be torch's `F.dropout`, the math path of `F.scaled_dot_product_attention` and the unfused layers bit
for bit, forward and gradients, with the same draws from torch's generator, and keep far fewer bytes for the
backward pass.
"""
import pytest
import torch
import torch.nn.functional as F

from models.lean_dropout import (
    LeanDropout,
    dropout,
    dropout_attention,
    mlp_fusion_backend,
    mlp_output,
    set_lean_dropout,
)
from models.linear_backend import OneDNNLinear, set_linear_backend
from models.transdiff import block_causal_mask
from tiny_runs import LABELS, loss_and_grads, tiny_model


def recording_saved_bytes(saved):
    """Saved-tensor hooks that record, in `saved` (None: nowhere), the bytes of every storage autograd keeps."""
    def pack(tensor):
        if saved is not None:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def qkv(queries, keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, queries, 8, generator=g)
    k, v = torch.randn(2, 3, keys, 8, generator=g), torch.randn(2, 3, keys, 8, generator=g)
    return [t.requires_grad_(True) for t in (q, k, v)]


def run_attention(lean, queries, keys, mask, saved_bytes=None):
    q, k, v = qkv(queries, keys)
    torch.manual_seed(3)  # the dropout draws

    with recording_saved_bytes(saved_bytes):
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
    x = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    with recording_saved_bytes(saved):
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


def mlp_tail(fused, hidden, layer, saved=None):
    """fc2(dropout(GELU(hidden))) and the gradients of hidden and fc2's parameters, fused or not."""
    hidden = hidden.detach().clone().requires_grad_(hidden.requires_grad)

    torch.manual_seed(3)
    with recording_saved_bytes(saved):
        out = (mlp_output(hidden, 0.3, layer, mlp_fusion_backend(hidden, 0.3, layer)) if fused
               else layer(F.dropout(F.gelu(hidden), 0.3)))
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
    grads = [hidden.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad]
    layer.zero_grad(set_to_none=True)
    return out, grads


LAYERS = {"aten": torch.nn.Linear, "onednn": OneDNNLinear}


@pytest.mark.parametrize("backend", sorted(LAYERS))
@pytest.mark.parametrize("shape", [(24, 32), (3, 8, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_mlp_output_is_the_unfused_layers_bit_for_bit_and_keeps_the_gelu_input_and_a_mask(shape, bias,
                                                                                                 backend):
    torch.manual_seed(0)
    layer = LAYERS[backend](32, 16, bias=bias)
    hidden = torch.randn(shape, requires_grad=True)  # [..., F]
    saved = {}
    out_ref, grads_ref = mlp_tail(False, hidden, layer)
    out, grads = mlp_tail(True, hidden, layer, saved)
    assert out.shape == out_ref.shape and torch.equal(out, out_ref)
    assert (grads_ref[2] is None) == (not bias)
    for name, grad, grad_ref in zip(("hidden", "weight", "bias")[:2 + bias], grads, grads_ref):
        assert torch.equal(grad, grad_ref), name
    weight = layer.weight.untyped_storage().data_ptr()
    assert saved.pop(weight) == layer.weight.numel() * 4
    assert sum(saved.values()) == hidden.numel() * (4 + 1)  # the GELU's input (float32) and the mask (bool)


@pytest.mark.parametrize("backend", sorted(LAYERS))
@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_fused_mlp_output_skips_the_gradients_nobody_asks_for(frozen, backend):
    torch.manual_seed(0)
    layer = LAYERS[backend](32, 16)
    hidden = torch.randn(3, 8, 32, requires_grad=frozen != "hidden")
    layer.weight.requires_grad_(frozen != "weight")
    out_ref, grads_ref = mlp_tail(False, hidden, layer)
    out, grads = mlp_tail(True, hidden, layer)
    assert torch.equal(out, out_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        assert (grad is None and grad_ref is None) or torch.equal(grad, grad_ref)
    assert (grads[0] is None) == (frozen == "hidden") and (grads[1] is None) == (frozen == "weight")


def tiny(mrar=False, grad_checkpointing=False, lean=False, linear_backend="aten"):
    model = tiny_model(mrar, grad_checkpointing, attn_dropout=0.2, proj_dropout=0.1)
    set_linear_backend(model, linear_backend)
    blocks = len(model.encoder_blocks) + len(model.diffdecoder.net.res_blocks)
    attentions_and_mlps = blocks + len(model.diffdecoder.net.res_blocks) + blocks
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    assert set_lean_dropout(model, lean) == attentions_and_mlps + len(dropouts)
    assert all(isinstance(module, LeanDropout) == lean for module in dropouts)
    return model


def loss_grads_and_calls(model):
    with torch.profiler.profile() as profile:
        loss, grads = loss_and_grads(model)
    calls = {name: sum(event.name == f"transdiff::{name}" for event in profile.events())
             for name in ("dropout_attention", "dropout", "gelu_dropout_linear")}
    return loss, grads, calls


@pytest.mark.parametrize("linear_backend", ["aten", "onednn"])
@pytest.mark.parametrize("mrar,grad_checkpointing", [(False, False), (True, False), (False, True)])
def test_lean_training_step_is_bit_identical(mrar, grad_checkpointing, linear_backend):
    loss_ref, grads_ref, calls_ref = loss_grads_and_calls(tiny(mrar, grad_checkpointing,
                                                               linear_backend=linear_backend))
    model = tiny(mrar, grad_checkpointing, lean=True, linear_backend=linear_backend)
    loss, grads, calls = loss_grads_and_calls(model)
    blocks = len(model.encoder_blocks), len(model.diffdecoder.net.res_blocks) * model.num_stages
    runs = 2 if grad_checkpointing else 1  # checkpointing recomputes
    assert calls_ref == {"dropout_attention": 0, "dropout": 0, "gelu_dropout_linear": 0}
    assert calls == {"dropout_attention": (blocks[0] + 2 * blocks[1]) * runs,  # self- (and cross-) attention
                     "dropout": (2 * blocks[0] + 3 * blocks[1]) * runs,  # attention outputs, the MLP's output
                     "gelu_dropout_linear": sum(blocks) * runs}  # the MLP's hidden layer
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
