"""Sampling's values are pinned: the latents of fixed tiny models, seeds and settings equal those saved in
tests/golden/sampling_cases.pt by the code before the host time grid and the pinned noise copies (commit 9249de3),
bit for bit on CPU."""
import pytest
import torch

from models.noise import PerImageNoise
from tests.support import GOLDEN_DIR
from tests.support.tiny_runs import tiny_model

# (name, mrar, samples kwargs): every sampler, guidance with and without an interval, MRAR's per-stage cfg.
CASES = [
    ("maruyama_cfg", False, dict(num_sampling_steps=5, cfg=1.5, sampler="maruyama", scale_0=0.9, scale_1=0.95)),
    ("maruyama_interval", False, dict(num_sampling_steps=6, cfg=2.0, sampler="maruyama", cfg_interval=(0.3, 0.8))),
    ("euler_interval", False, dict(num_sampling_steps=4, cfg=1.5, sampler="euler", cfg_interval=(0.5, 1.0))),
    ("heun", False, dict(num_sampling_steps=3, cfg=1.0, sampler="heun")),
    ("mrar_stages", True, dict(num_sampling_steps=3, cfg=[1.0, 1.5, 2.0, 1.2], sampler="maruyama")),
]
LABELS = torch.tensor([2, 0, 4, 2])


def sample(mrar, kwargs):
    model = tiny_model(mrar=mrar).eval()
    noise = PerImageNoise.from_seeds((7 << 32) + i for i in range(len(LABELS)))
    return model.samples(LABELS, generator=noise, **kwargs)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN_DIR / "sampling_cases.pt", weights_only=True)


@pytest.mark.parametrize("name,mrar,kwargs", CASES, ids=[case[0] for case in CASES])
def test_sampling_equals_the_saved_latents_bit_for_bit(golden, name, mrar, kwargs):
    assert torch.equal(sample(mrar, kwargs), golden[name])
