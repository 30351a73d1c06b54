"""models.bernoulli_draws: dropout noise and masks from torch's CPU generator, drawn as torch's Bernoulli kernel
draws them on CPUs where it does not use MKL, by a compiled C loop.

The compiled draw is checked against an independent reference (numpy's MT19937 set to torch's generator state,
and torch's formula in floating point), on any CPU; where torch itself draws from the twister, it must be used
and give torch's values; elsewhere torch's own kernel stays.
"""
import numpy as np
import pytest
import torch

from models.bernoulli_draws import (
    _GeneratorState,
    _reproduces_torch,
    compiled_draw,
    dropout_draws,
    torch_noise_and_mask,
    vectorised_draw,
)

SIZES = [1, 2, 311, 312, 313, 623, 624, 625, 1249, 100_003]


@pytest.fixture(scope="module")
def draw():
    """The compiled draw without the self-check that `vectorised_draw` puts before it."""
    compiled = compiled_draw()
    assert compiled is not None, "the C compiler that torch.compile uses should build models/bernoulli_draws.c"
    return compiled


def torchs_twister():
    """The twister's fields of torch's default CPU generator state (a copy)."""
    return _GeneratorState.from_buffer(torch.get_rng_state().numpy()).legacy_pod


def twister_at_torchs_state():
    """numpy's MT19937 at torch's default CPU generator state (torch's `left` is 625 minus numpy's `pos`)."""
    legacy = torchs_twister()
    twister = np.random.MT19937()
    twister.state = {"bit_generator": "MT19937",
                     "state": {"key": np.array(legacy.state, dtype=np.uint32), "pos": 625 - legacy.left}}
    return twister


def reference_draw(numel, p):
    """torch's formula: per element, outputs a then b, uniform = ((a mod 2^21) 2^32 + b) 2^-53, kept if below 1-p;
    returns the mask and numpy's state after the draw as torch's (words, left, next)."""
    twister = twister_at_torchs_state()
    outputs = twister.random_raw(2 * numel).astype(np.uint64)
    integers = ((outputs[0::2] & np.uint64(0x1FFFFF)) << np.uint64(32)) | outputs[1::2]
    kept = integers.astype(np.float64) * 2.0 ** -53 < 1 - p
    after = twister.state["state"]
    return torch.from_numpy(kept), (after["key"].astype(np.uint64), 625 - after["pos"], after["pos"])


def generator_words_left_and_next():
    legacy = torchs_twister()
    return np.array(legacy.state, dtype=np.uint64), legacy.left, legacy.next


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
@pytest.mark.parametrize("offset", [0, 1, 624])  # outputs drawn since seeding (0: the state not yet generated)
def test_compiled_draw_is_the_twister_and_torchs_formula(draw, numel, p, offset):
    torch.manual_seed(numel)
    torch.rand(offset)  # one output each
    expected_kept, (expected_words, expected_left, expected_next) = reference_draw(numel, p)
    noise, kept = draw(torch.empty(numel), p)
    words, left, next_word = generator_words_left_and_next()
    assert torch.equal(kept, expected_kept)
    assert torch.equal(noise, torch.where(kept, torch.ones(()).div_(1 - p), torch.zeros(())))
    assert np.array_equal(words, expected_words) and (left, next_word) == (expected_left, expected_next)


def torch_draws_from_the_twister():
    """Whether torch's own Bernoulli kernel draws as the reference does here (all CPUs but Intel's, with MKL)."""
    torch.manual_seed(0)
    expected_kept, _ = reference_draw(1000, 0.1)
    torch.manual_seed(0)
    return torch.equal(torch_noise_and_mask(torch.empty(1000), 0.1)[1], expected_kept)


def test_used_exactly_where_torch_draws_from_the_twister():
    assert (vectorised_draw() is not None) == torch_draws_from_the_twister()


@pytest.mark.parametrize("shape", [(3, 5, 7), (8, 12, 64, 64)])
@pytest.mark.parametrize("transposed", [False, True])
def test_dropout_draws_are_torchs_values_and_generator_state(shape, transposed):
    like = torch.empty(shape).transpose(0, -1) if transposed else torch.empty(shape)
    torch.manual_seed(7)
    expected_noise, expected_kept = torch_noise_and_mask(like, 0.1)
    expected_state = torch.get_rng_state()
    torch.manual_seed(7)
    noise, kept = dropout_draws(like, 0.1)
    assert torch.equal(noise, expected_noise) and torch.equal(kept, expected_kept)
    assert noise.stride() == expected_noise.stride()
    assert torch.equal(torch.get_rng_state(), expected_state)


def test_self_check_refuses_a_draw_that_is_not_torchs():
    def other_draw(like, p):
        kept = torch.rand(like.shape) < 1 - p
        return kept.float().div_(1 - p), kept

    assert not _reproduces_torch(other_draw)


def test_without_a_compiler_torchs_kernel_draws(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    vectorised_draw.cache_clear()
    try:
        assert vectorised_draw() is None
        torch.manual_seed(1)
        expected = torch_noise_and_mask(torch.empty(4000), 0.1)
        torch.manual_seed(1)
        assert all(map(torch.equal, dropout_draws(torch.empty(4000), 0.1), expected))
    finally:
        vectorised_draw.cache_clear()
