"""Sources of Gaussian noise for sampling, so that randomness is injected rather than global.

* `TorchNoise(generator)`: draws whole tensors from one `torch.Generator` (or the global RNG).
* `PerImageNoise(generators)`: row `i` of every draw comes from generator `i`, so an image's noise does
  not depend on which batch it landed in (EDM's `StackedRandomGenerator` idea).
* `PhiloxNoise(keys)`: the same with numpy's Philox counter-based generator per image, keyed by a 128-bit
  integer: nothing of the key is truncated (torch's CPU generator keeps only 32 bits of a seed).

Anything with the `NoiseSource` method `randn(shape, *, device, dtype)` can be passed instead.
"""
from typing import Iterable, Optional, Protocol, Sequence

import numpy as np
import torch


class NoiseSource(Protocol):
    def randn(self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        ...


def to_device(draw: torch.Tensor, device) -> torch.Tensor:
    """`draw` on `device`. A host draw bound for a GPU goes through pinned memory and is copied asynchronously, so
    the host does not wait for the GPU (a copy from ordinary host memory would)."""
    device = torch.device(device)
    if device.type == "cuda" and draw.device.type == "cpu" and not draw.is_pinned():
        draw = draw.pin_memory()
    return draw.to(device, non_blocking=True)


class TorchNoise:
    """Whole draws from one generator (its device's), or from the global generator on the target device."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def randn(self, shape, *, device, dtype):
        if self.generator is None:
            return torch.randn(tuple(shape), device=device, dtype=dtype)
        draw = torch.randn(tuple(shape), generator=self.generator, device=self.generator.device, dtype=dtype)
        return to_device(draw, device)


class PerImageNoise:
    """Row `i` of every draw from generator `i`. CPU generators draw straight into (pinned) host memory."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Iterable[int]) -> "PerImageNoise":
        """One CPU generator per seed: draws happen on the CPU, so they do not depend on the device."""
        return cls([torch.Generator().manual_seed(int(seed)) for seed in seeds])

    def randn(self, shape, *, device, dtype):
        if shape[0] != len(self.generators):
            raise ValueError(f"draw of batch {shape[0]} but {len(self.generators)} per-image generators")
        if any(generator.device.type != "cpu" for generator in self.generators):
            rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in self.generators]
            return torch.stack(rows).to(device)  # [B, *shape[1:]]
        draw = torch.empty(tuple(shape), dtype=dtype, pin_memory=torch.device(device).type == "cuda")  # [B, ...]
        for row, generator in zip(draw, self.generators):
            torch.randn(tuple(shape[1:]), generator=generator, dtype=dtype, out=row)
        return to_device(draw, device)


class PhiloxNoise:
    """Row `i` of every draw from numpy's Philox generator with key `keys[i]` (an int below 2**128): standard
    normals by numpy's `Generator.standard_normal` in float32, drawn on the host (into pinned memory for a GPU),
    so an image's noise depends on its key alone, not on its batch or the device."""

    def __init__(self, keys: Iterable[int]):
        self.generators = [np.random.Generator(np.random.Philox(key=int(key))) for key in keys]

    def randn(self, shape, *, device, dtype):
        if shape[0] != len(self.generators):
            raise ValueError(f"draw of batch {shape[0]} but {len(self.generators)} per-image generators")
        draw = torch.empty(tuple(shape), dtype=torch.float32, pin_memory=torch.device(device).type == "cuda")
        for row, generator in zip(draw.numpy(), self.generators):  # [B, ...] on the host, written in place
            generator.standard_normal(out=row, dtype=np.float32)
        return to_device(draw, device).to(dtype)


def as_noise_source(generator) -> NoiseSource:
    """Accept None, a torch.Generator, a sequence of per-image generators, or a NoiseSource."""
    if generator is None or isinstance(generator, torch.Generator):
        return TorchNoise(generator)
    if isinstance(generator, (list, tuple)):
        return PerImageNoise(generator)
    if hasattr(generator, "randn"):
        return generator
    raise TypeError(f"cannot draw noise from {type(generator).__name__}")
