"""util.run_state's generator states: each rank saves and restores its own device's, on any GPU layout (CUDA
mocked)."""
import random

import numpy as np
import pytest
import torch

from util import run_state


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA generator states as tensors naming their device; `restored` records set_rng_state calls."""
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.item(), device)))
    return restored


def cpu_states():
    return run_state.rng_state(torch.device("cpu"))


def test_a_rank_saves_the_generator_of_its_own_device_only(fake_cuda):
    state = run_state.rng_state(torch.device("cuda", 3))
    assert state["cuda_device"].item() == 3 and "cuda" not in state
    assert "cuda_device" not in run_state.rng_state(torch.device("cpu"))


def test_restore_puts_the_state_on_the_own_device_whatever_the_layout(fake_cuda):
    saved = {**cpu_states(), "cuda_device": torch.tensor([5], dtype=torch.uint8)}  # saved on cuda:5 of 8
    assert run_state.restore_rng_state([saved], torch.device("cuda", 1))  # now cuda:1 of 4
    assert fake_cuda == [(5, torch.device("cuda", 1))]


def test_an_older_checkpoint_with_every_visible_gpu_still_loads(fake_cuda):
    """Older checkpoints held `get_rng_state_all()`; restoring that list on a process that sees fewer GPUs raised
    IndexError. Now the device's own entry is taken when there is one; otherwise a warning, and the run goes on."""
    older = {**cpu_states(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    assert run_state.restore_rng_state([older], torch.device("cuda", 6))
    assert fake_cuda == [(6, torch.device("cuda", 6))]
    short = {**cpu_states(), "cuda": [torch.tensor([0], dtype=torch.uint8)]}
    with pytest.warns(UserWarning, match="no generator state for cuda:2"):
        assert run_state.restore_rng_state([short], torch.device("cuda", 2))
    assert fake_cuda == [(6, torch.device("cuda", 6))]


def test_cpu_states_round_trip_and_another_world_size_restores_nothing():
    np.random.rand(5)  # numpy's position inside its key block is part of its state
    saved = cpu_states()
    expected = torch.rand(3), np.random.rand(), random.random()
    assert run_state.restore_rng_state([saved], torch.device("cpu"))
    again = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]
    assert not run_state.restore_rng_state([saved, saved], torch.device("cpu"))
