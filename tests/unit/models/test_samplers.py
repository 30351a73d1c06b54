"""models.samplers, pinned to their formulas: the time grids, the reverse-SDE drift, one Euler-Maruyama step, which
times each sampler asks the velocity at and how often, where noise enters, and the dispatcher's refusals. The
golden and parity tests hold the whole model's samples; these hold the conventions one by one, in float64."""
import pytest
import torch

from models import samplers
from models.samplers import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    euler,
    euler_maruyama,
    euler_maruyama_step,
    heun,
    network_evaluations,
    ode_time_grid,
    run_sampler,
    sde_drift,
    sde_time_grid,
)

X = torch.tensor([[[0.5, -1.0], [2.0, 0.25]]], dtype=torch.float64)  # [B=1, L=2, C=2]


class Recorded:
    """A velocity `a * x + b * t` that records the times it is asked at."""

    def __init__(self, a=0.5, b=-2.0):
        self.a, self.b, self.times = a, b, []

    def __call__(self, x, t):
        self.times.append(float(t))
        return self.a * x + self.b * t


class FixedNoise:
    """Draws 1, 2, 3, ... times a fixed pattern, in the dtype and on the device asked."""

    def __init__(self):
        self.draws = 0

    def randn(self, shape, *, device, dtype):
        self.draws += 1
        pattern = torch.arange(torch.Size(shape).numel(), dtype=dtype, device=device).reshape(shape)
        return self.draws * (pattern - 1.5)


def test_time_grids():
    sde = sde_time_grid(4)
    assert sde.dtype == torch.float32 and sde.device.type == "cpu"
    assert torch.allclose(sde, torch.tensor([1.0, 0.68, 0.36, 0.04, 0.0]), atol=1e-7, rtol=0)
    assert samplers.SDE_END_TIME == 0.04 and sde_time_grid(2).tolist() == pytest.approx([1.0, 0.04, 0.0])
    ode = ode_time_grid(4)
    assert ode.dtype == torch.float32 and ode.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert sde_time_grid(3, device="meta").device.type == "meta" and ode_time_grid(3, device="meta").is_meta


@pytest.mark.parametrize("t", [0.04, 0.3, 0.68, 1.0])
def test_the_drift_is_two_minus_t_times_v_plus_x(t):
    v = torch.tensor([[[1.5, -0.5], [0.25, 3.0]]], dtype=torch.float64)
    t = torch.tensor(t, dtype=torch.float64)
    assert torch.allclose(sde_drift(v, X, t), (2 - t) * v + X, atol=1e-12, rtol=0)


def test_one_euler_maruyama_step():
    drift, eps = torch.full_like(X, 0.75), torch.full_like(X, -1.25)
    t, dt = torch.tensor(0.64, dtype=torch.float64), torch.tensor(-0.09, dtype=torch.float64)
    expected = X + 0.5 * drift * dt + 2.0 * (2 * 0.64) ** 0.5 * eps * 0.3
    assert torch.allclose(euler_maruyama_step(X, drift, t, dt, 0.5, 2.0, eps), expected, atol=1e-12, rtol=0)
    assert torch.allclose(euler_maruyama_step(X, drift, t, dt), X + drift * dt, atol=1e-12, rtol=0)
    assert torch.allclose(euler_maruyama_step(X, drift, t, dt, scale_1=2.0), X + drift * dt, atol=1e-12, rtol=0)
    unscaled = X + drift * dt + (2 * 0.64) ** 0.5 * eps * 0.3  # the default scales are 1
    assert torch.allclose(euler_maruyama_step(X, drift, t, dt, eps=eps), unscaled, atol=1e-12, rtol=0)


def test_euler_maruyama_scales_default_to_one():
    grid = sde_time_grid(3).double()
    assert torch.equal(euler_maruyama(Recorded(), X, grid, FixedNoise()),
                       euler_maruyama(Recorded(), X, grid, FixedNoise(), 1.0, 1.0))


def test_run_sampler_scales_default_to_one():
    assert torch.equal(run_sampler("maruyama", Recorded(), X, 3, FixedNoise()),
                       euler_maruyama(Recorded(), X, sde_time_grid(3), FixedNoise(), 1.0, 1.0))


def test_the_grids_are_float32_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert sde_time_grid(3).dtype == ode_time_grid(3).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("scale_0, scale_1", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
def test_euler_maruyama_takes_n_minus_one_noisy_steps_then_a_mean_step(scale_0, scale_1):
    grid = sde_time_grid(4).double()
    velocity, noise = Recorded(), FixedNoise()
    result = euler_maruyama(velocity, X, grid, noise, scale_0, scale_1)
    expected, check = X, FixedNoise()
    for i in range(3):
        t, dt = grid[i], grid[i + 1] - grid[i]
        eps = check.randn(X.shape, device="cpu", dtype=X.dtype)
        drift = (2 - t) * (0.5 * expected - 2.0 * t) + expected
        expected = expected + scale_0 * drift * dt + scale_1 * torch.sqrt(2 * t) * eps * torch.sqrt(-dt)
    t = grid[3]
    expected = expected + ((2 - t) * (0.5 * expected - 2.0 * t) + expected) * (0 - t)
    assert torch.allclose(result, expected, atol=1e-12, rtol=0)
    assert velocity.times == pytest.approx(grid[:-1].tolist())
    assert noise.draws == (3 if scale_1 != 0 else 0)


def test_euler_and_heun_ask_the_velocity_on_the_ode_grid():
    grid = ode_time_grid(4).double()
    velocity = Recorded()
    expected = X
    for t, t_next in zip(grid[:-1], grid[1:]):
        expected = expected + (t_next - t) * (0.5 * expected - 2.0 * t)
    assert torch.allclose(euler(velocity, X, grid), expected, atol=1e-12, rtol=0)
    assert velocity.times == [1.0, 0.75, 0.5, 0.25]
    velocity, expected = Recorded(), X
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        v = 0.5 * expected - 2.0 * t
        predicted = expected + dt * v
        expected = expected + dt * 0.5 * (v + 0.5 * predicted - 2.0 * t_next)
    assert torch.allclose(heun(velocity, X, grid), expected, atol=1e-12, rtol=0)
    assert velocity.times == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0]


def test_heun_is_exact_for_a_velocity_linear_in_time():
    """dx/dt = -2t from t = 1 to 0 adds 1, whatever the step count (the trapezoid rule is exact)."""
    result = heun(Recorded(a=0.0), X, ode_time_grid(3).double())
    assert torch.allclose(result, X + 1.0, atol=1e-7, rtol=0)


def test_the_registry():
    assert DEFAULT_SAMPLER == "maruyama"
    assert {name: (spec.run, spec.time_grid, spec.stochastic, spec.evals_per_step, spec.min_steps)
            for name, spec in SAMPLERS.items()} == {
        "maruyama": (euler_maruyama, sde_time_grid, True, 1, 2),
        "euler": (euler, ode_time_grid, False, 1, 1),
        "heun": (heun, ode_time_grid, False, 2, 1)}
    assert [network_evaluations(name, 5) for name in ("maruyama", "euler", "heun")] == [5, 5, 10]


@pytest.mark.parametrize("name, steps", [("maruyama", 2), ("maruyama", 3), ("euler", 1), ("heun", 4)])
def test_run_sampler_runs_the_named_sampler_on_its_grid(name, steps):
    velocity = Recorded()
    result = run_sampler(name, velocity, X, steps, FixedNoise(), scale_0=0.5 if name == "maruyama" else 1.0)
    spec = SAMPLERS[name]
    grid = spec.time_grid(steps)
    arguments = dict(scale_0=0.5) if spec.stochastic else {}
    assert torch.equal(result, spec.run(Recorded(), X, grid, FixedNoise(), **arguments))
    assert len(velocity.times) == network_evaluations(name, steps)


@pytest.mark.parametrize("name, steps, kwargs, message", [
    ("ddim", 4, {}, r"^unknown sampler 'ddim'; choose one of \['euler', 'heun', 'maruyama'\]$"),
    ("euler", 0, {}, "^num_steps must be >= 1, got 0$"),
    ("maruyama", 0, {}, "^num_steps must be >= 1, got 0$"),
    ("maruyama", 1, {}, "^the maruyama sampler needs at least 2 steps, got 1$"),
    ("heun", 2, {"scale_0": 0.5}, "^scale_0/scale_1 only apply to the maruyama sampler, not 'heun'; leave them at "
                                  r"1\.0$"),
    ("euler", 2, {"scale_1": 0.0}, "^scale_0/scale_1 only apply to the maruyama sampler, not 'euler'"),
])
def test_run_sampler_refuses(name, steps, kwargs, message):
    velocity = Recorded()
    with pytest.raises(ValueError, match=message):
        run_sampler(name, velocity, X, steps, FixedNoise(), **kwargs)
    assert velocity.times == []
