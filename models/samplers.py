"""Samplers: pure functions of (velocity function, initial noise, time grid, noise source).

A velocity function maps `(x [B, L, C], t)` to `v [B, L, C]`, where `t` is a 0-dim float32 tensor in [0, 1]
(t = 1 is noise, see `models.flow`) on the host. Samplers know nothing about the network's time scale,
classifier-free guidance or `no_grad`; the caller wraps those into the velocity function.

The time grid lives on the host, whatever the device of `x`: a step's times enter the device's arithmetic as
scalars, and a decision on them (`--cfg_interval`) reads no device memory, so no sampling step waits for a GPU.

* `euler_maruyama` (the original's `maruyama`): the SDE with diffusion g(t)^2 = 2t on the grid
  `linspace(1, 0.04, N)` + [0]; N-1 stochastic steps, then one noise-free mean step to 0 (N network
  evaluations). `scale_0` multiplies the drift term and `scale_1` the injected noise of each stochastic
  step; the final mean step uses neither.
* `euler`, `heun`: deterministic probability-flow ODE on `linspace(1, 0, N + 1)` (N, resp. 2N
  evaluations).
"""
from typing import Callable, Dict, NamedTuple, Optional

import torch

from models.noise import NoiseSource

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SDE_END_TIME = 0.04  # Parity: the original's stochastic steps stop at t = 0.04, then take one mean step.


def sde_time_grid(num_steps: int, device=None) -> torch.Tensor:
    """[N + 1] float32: `linspace(1, SDE_END_TIME, N)` followed by 0."""
    grid = torch.linspace(1.0, SDE_END_TIME, num_steps, dtype=torch.float32, device=device)
    return torch.cat([grid, grid.new_zeros(1)])


def ode_time_grid(num_steps: int, device=None) -> torch.Tensor:
    """[N + 1] float32: `linspace(1, 0, N + 1)`."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device)


def sde_drift(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Reverse-SDE drift `v - ½ g² · score` for the linear path (alpha = 1 - t, sigma = t), g² = 2t.

    The score is recovered from the velocity. Parity: the operations follow the original's order so that
    the last bits agree; algebraically the result is `(2 - t) · v + x`.
    """
    alpha_ratio = (1 - t) / -1
    variance = t ** 2 - alpha_ratio * t
    score = (alpha_ratio * v - x) / variance
    return v - 0.5 * (2 * t) * score


def euler_maruyama_step(x: torch.Tensor, drift: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                        scale_0: float = 1.0, scale_1: float = 1.0,
                        eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x + scale_0·drift·dt + scale_1·sqrt(2t)·eps·sqrt(|dt|)`; with `eps=None` the noise term is off."""
    x_next = x + scale_0 * drift * dt
    if eps is not None:
        x_next = x_next + scale_1 * torch.sqrt(2 * t) * (eps * torch.sqrt(torch.abs(dt)))
    return x_next


def euler_maruyama(velocity: VelocityFn, x: torch.Tensor, t_steps: torch.Tensor, noise: NoiseSource,
                   scale_0: float = 1.0, scale_1: float = 1.0) -> torch.Tensor:
    """Integrate from `x` (noise at t_steps[0] = 1) to t = 0; `t_steps` from `sde_time_grid`."""
    num_stochastic = len(t_steps) - 2
    for i in range(num_stochastic):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        eps = noise.randn(x.shape, device=x.device, dtype=x.dtype) if scale_1 != 0 else None
        drift = sde_drift(velocity(x, t_cur), x, t_cur)
        x = euler_maruyama_step(x, drift, t_cur, t_next - t_cur, scale_0, scale_1, eps)
    t_cur, t_next = t_steps[-2], t_steps[-1]
    drift = sde_drift(velocity(x, t_cur), x, t_cur)
    return euler_maruyama_step(x, drift, t_cur, t_next - t_cur)


def euler(velocity: VelocityFn, x: torch.Tensor, t_steps: torch.Tensor, noise: Optional[NoiseSource] = None,
          ) -> torch.Tensor:
    """Deterministic Euler on the probability-flow ODE dx/dt = v."""
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur)
    return x


def heun(velocity: VelocityFn, x: torch.Tensor, t_steps: torch.Tensor, noise: Optional[NoiseSource] = None,
         ) -> torch.Tensor:
    """Deterministic Heun (trapezoidal predictor-corrector) on dx/dt = v."""
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        dt = t_next - t_cur
        v_cur = velocity(x, t_cur)
        x_pred = x + dt * v_cur
        x = x + dt * 0.5 * (v_cur + velocity(x_pred, t_next))
    return x


class SamplerSpec(NamedTuple):
    """What the CLI, the engine and the notebook need to know of a sampler.

    `run(velocity, x, t_steps, noise[, scale_0, scale_1])` integrates from noise to data; a stochastic
    sampler draws from `noise` and takes the `scale_0`/`scale_1` of the original, a deterministic one
    takes neither. `evals_per_step` is the network evaluations per step of the time grid.
    """

    run: Callable[..., torch.Tensor]
    time_grid: Callable[..., torch.Tensor]
    stochastic: bool
    evals_per_step: int
    min_steps: int = 1


SAMPLERS: Dict[str, SamplerSpec] = {
    # N-1 stochastic steps and one mean step: at least 2.
    "maruyama": SamplerSpec(euler_maruyama, sde_time_grid, stochastic=True, evals_per_step=1, min_steps=2),
    "euler": SamplerSpec(euler, ode_time_grid, stochastic=False, evals_per_step=1),
    "heun": SamplerSpec(heun, ode_time_grid, stochastic=False, evals_per_step=2),
}
DEFAULT_SAMPLER = "maruyama"  # the original's, used for the paper's numbers


def network_evaluations(name: str, num_steps: int) -> int:
    """Velocity-network evaluations per image (per MRAR stage), without guidance's doubled batch."""
    return SAMPLERS[name].evals_per_step * num_steps


def run_sampler(name: str, velocity: VelocityFn, x: torch.Tensor, num_steps: int, noise: NoiseSource,
                scale_0: float = 1.0, scale_1: float = 1.0) -> torch.Tensor:
    """Dispatch by name; `scale_0`/`scale_1` exist only for the stochastic sampler."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    spec = SAMPLERS[name]
    if num_steps < spec.min_steps:
        raise ValueError(f"the {name} sampler needs at least {spec.min_steps} steps, got {num_steps}")
    t_steps = spec.time_grid(num_steps)  # [N + 1] on the host
    if spec.stochastic:
        return spec.run(velocity, x, t_steps, noise, scale_0=scale_0, scale_1=scale_1)
    if (scale_0, scale_1) != (1.0, 1.0):
        raise ValueError(f"scale_0/scale_1 only apply to the maruyama sampler, not {name!r}; leave them at 1.0")
    return spec.run(velocity, x, t_steps)
