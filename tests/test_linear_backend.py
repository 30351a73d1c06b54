"""models.linear_backend: the linear layers' float32 CPU products in oneDNN against torch's own (`nn.Linear`).

oneDNN sums in another order than MKL, so results agree to float32 rounding; everything else (parameters, state
dict, fallbacks) is exact.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from models.linear_backend import LINEAR_BACKENDS, OneDNNLinear, set_linear_backend
from tiny_runs import LABELS, loss_and_grads, tiny_model


def linear_pair(bias: bool, in_features: int = 96, out_features: int = 160):
    torch.manual_seed(0)
    reference = nn.Linear(in_features, out_features, bias=bias)
    onednn = copy.deepcopy(reference)
    set_linear_backend(onednn, "onednn")
    return reference, onednn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 96), (3, 41, 96)])
def test_onednn_linear_matches_torch_forward_and_backward(bias, shape):
    reference, onednn = linear_pair(bias)
    assert type(onednn) is OneDNNLinear
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(*shape[:-1], 160, generator=torch.Generator().manual_seed(2))
    results = []
    for layer in (reference, onednn):
        x_in = x.clone().requires_grad_(True)
        with torch.profiler.profile() as profile:
            out = layer(x_in)
            out.backward(grad_out)
        calls = sum(event.name == "mkldnn::_linear_pointwise" for event in profile.events())
        assert calls == (3 if layer is onednn else 0)  # the forward product and both backward products
        results.append((out, x_in.grad, layer.weight.grad, layer.bias.grad if bias else None))
    (out_ref, gx_ref, gw_ref, gb_ref), (out, gx, gw, gb) = results
    assert out.shape == out_ref.shape == (*shape[:-1], 160)
    assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert_close(gw, gw_ref, rtol=1e-5, atol=1e-4)
    if bias:
        assert_close(gb, gb_ref, rtol=1e-5, atol=1e-5)


def test_onednn_linear_skips_the_gradients_nobody_asked_for():
    reference, onednn = linear_pair(bias=True)
    onednn.requires_grad_(False)
    x = torch.randn(5, 96, requires_grad=True)
    with torch.profiler.profile() as profile:
        onednn(x).sum().backward()
    assert sum(event.name == "mkldnn::_linear_pointwise" for event in profile.events()) == 2  # no weight product
    assert_close(x.grad, reference.weight.sum(0).expand(5, -1), rtol=1e-5, atol=1e-5)
    assert onednn.weight.grad is None and onednn.bias.grad is None


def test_outside_float32_cpu_the_layer_is_torchs_own():
    reference, onednn = linear_pair(bias=True)
    x = torch.randn(7, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = onednn(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, reference(x))
    reference.double(), onednn.double()
    assert torch.equal(onednn(x.double()), reference(x.double()))


def test_switching_keeps_parameters_state_dict_and_is_reversible():
    torch.manual_seed(0)
    model = tiny_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert set_linear_backend(model, "onednn") == len(linears) > 10
    assert all(type(module) is OneDNNLinear for module in linears)
    assert type(copy.deepcopy(model).diffdecoder.net.input_proj) is OneDNNLinear  # the EMA copy
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert set_linear_backend(model, "aten") == len(linears)
    assert all(type(module) is nn.Linear for module in linears)


def test_unknown_backend_and_missing_onednn_are_refused(monkeypatch):
    model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=f"unknown linear backend 'blas'; choose one of {', '.join(LINEAR_BACKENDS)}"):
        set_linear_backend(model, "blas")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(ValueError, match="this torch build has no oneDNN"):
        set_linear_backend(model, "onednn")
    assert type(model) is nn.Linear


def switched(backend, mrar=False):
    model = tiny_model(mrar, attn_dropout=0.1, proj_dropout=0.1)
    set_linear_backend(model, backend)
    return model


@pytest.mark.parametrize("mrar", [False, True])
def test_onednn_training_step_equals_torchs(mrar):
    loss_ref, grads_ref = loss_and_grads(switched("aten", mrar))
    loss, grads = loss_and_grads(switched("onednn", mrar))
    assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_onednn_sampling_equals_torchs():
    noise = torch.randn(len(LABELS), 64, 4, generator=torch.Generator().manual_seed(4))  # [B, N, C]
    samples = [switched(backend).eval().samples(LABELS, 8, cfg=1.5, noise=noise,
                                                  generator=torch.Generator().manual_seed(5))
               for backend in LINEAR_BACKENDS]
    assert_close(samples[1], samples[0], rtol=1e-5, atol=1e-5)
