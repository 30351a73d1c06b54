"""models.flow, pinned to its conventions: t = 1 is noise, x_t = (1 - t) x0 + t eps, the target eps - x0, the
network's time input k = floor(1000 sigmoid(n)) as int64, the per-sample loss in float32, and the draw order (noise,
then times) of the original."""
import pytest
import torch

from models.flow import TIME_SCALE, FlowLossOutput, flow_matching_loss, sample_timesteps

X0 = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2) / 10  # [B, L, C]
NOISE = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(2, 3, 2)


def test_timesteps_are_a_quantised_logit_normal():
    assert TIME_SCALE == 1000
    times = sample_timesteps(6, torch.device("cpu"), torch.Generator().manual_seed(4))
    normal = torch.randn(6, generator=torch.Generator().manual_seed(4))
    assert times.dtype == torch.int64 and times.tolist() == [int(1000 * torch.sigmoid(n)) for n in normal]
    many = sample_timesteps(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0 <= many.min() and many.max() <= 999 and abs(many.double().mean().item() - 499.5) < 5


def test_the_interpolation_the_target_and_the_loss():
    timesteps = torch.tensor([0, 750])
    seen = []

    def velocity(x_t, k):
        seen.append(k)
        return x_t * 2

    out = flow_matching_loss(velocity, X0, noise=NOISE, timesteps=timesteps)
    assert isinstance(out, FlowLossOutput) and seen[0] is timesteps and out.timesteps is timesteps
    t = torch.tensor([0.0, 0.75], dtype=torch.float64).view(2, 1, 1)
    assert torch.allclose(out.x_t, (1 - t) * X0 + t * NOISE, atol=1e-12, rtol=0)
    assert torch.equal(out.x_t[0], X0[0])  # t = 0 is data
    assert torch.equal(out.prediction, out.x_t * 2)
    expected = ((out.x_t * 2 - (NOISE - X0)) ** 2).mean(dim=(1, 2)).float()
    assert out.loss.dtype == torch.float32 and out.loss.shape == (2,)
    assert torch.allclose(out.loss, expected, atol=1e-6, rtol=0)
    perfect = flow_matching_loss(lambda x_t, k: NOISE - X0, X0, noise=NOISE, timesteps=timesteps)
    assert torch.equal(perfect.loss, torch.zeros(2))


def test_the_loss_is_float32_whatever_the_prediction_dtype():
    out = flow_matching_loss(lambda x_t, k: x_t.bfloat16(), X0.float(), noise=NOISE.float(),
                             timesteps=torch.tensor([10, 990]))
    expected = ((out.prediction.float() - (NOISE - X0).float()) ** 2).mean(dim=(1, 2))
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss, expected)


@pytest.mark.parametrize("given", ["nothing", "noise", "timesteps"])
def test_noise_is_drawn_first_then_the_times(given):
    generator = torch.Generator().manual_seed(9)
    noise = NOISE if given == "noise" else None
    timesteps = torch.tensor([1, 2]) if given == "timesteps" else None
    out = flow_matching_loss(lambda x_t, k: x_t, X0, noise=noise, timesteps=timesteps, generator=generator)
    replay = torch.Generator().manual_seed(9)
    expected_noise = NOISE if noise is not None else torch.randn(X0.shape, dtype=X0.dtype, generator=replay)
    expected_times = timesteps if timesteps is not None else sample_timesteps(2, torch.device("cpu"), replay)
    assert torch.equal(out.timesteps, expected_times)
    t = (expected_times / 1000).double().view(2, 1, 1)
    assert torch.allclose(out.x_t, (1 - t) * X0 + t * expected_noise, atol=1e-12, rtol=0)
