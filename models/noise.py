"""Sources of Gaussian noise for sampling, so that randomness is injected rather than global.

* `TorchNoise(generator)`: draws whole tensors from one `torch.Generator` (or the global RNG).
* `PerImageNoise(generators)`: row `i` of every draw comes from generator `i`, so an image's noise does
  not depend on which batch it landed in (EDM's `StackedRandomGenerator` idea).

Anything with the `NoiseSource` method `randn(shape, *, device, dtype)` can be passed instead.
"""
from typing import Iterable, Optional, Protocol, Sequence

import torch


class NoiseSource(Protocol):
    def randn(self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        ...


class TorchNoise:
    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def randn(self, shape, *, device, dtype):
        device = self.generator.device if self.generator is not None else device
        return torch.randn(tuple(shape), generator=self.generator, device=device, dtype=dtype)


class PerImageNoise:
    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Iterable[int]) -> "PerImageNoise":
        """One CPU generator per seed: draws happen on the CPU, so they do not depend on the device."""
        return cls([torch.Generator().manual_seed(int(seed)) for seed in seeds])

    def randn(self, shape, *, device, dtype):
        if shape[0] != len(self.generators):
            raise ValueError(f"draw of batch {shape[0]} but {len(self.generators)} per-image generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)  # [B, *shape[1:]]


def as_noise_source(generator) -> NoiseSource:
    """Accept None, a torch.Generator, a sequence of per-image generators, or a NoiseSource."""
    if generator is None or isinstance(generator, torch.Generator):
        return TorchNoise(generator)
    if isinstance(generator, (list, tuple)):
        return PerImageNoise(generator)
    if hasattr(generator, "randn"):
        return generator
    raise TypeError(f"cannot draw noise from {type(generator).__name__}")
