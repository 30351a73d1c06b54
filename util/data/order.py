"""The training data's order and random draws as functions of (seed, epoch, position), so that a run resumed in
the middle of an epoch sees exactly the batches, crops and flips an uninterrupted run would have seen.

* `ResumableSampler`: `DistributedSampler`'s shuffled shard of an epoch, started `start_batch` batches in. It
  yields `(epoch, index)` keys, so that the epoch reaches the loader's workers with every sample, persistent
  workers included (they keep their own copy of the dataset from the epoch they started in).
* `SeededSamples`: draws the augmentation of key `(epoch, index)` (crop offset, flip, cached-latent mirror) from
  the CPU generator seeded by `augmentation_seed(seed, epoch, index, size)`, in the loader worker or the main
  process alike, without touching the process's global RNG (which the model's own draws use and a checkpoint
  restores). torch's CPU generator keeps 32 bits of a seed, so the seed is a 32-bit number: every
  (epoch, index) of a run gets its own as long as epochs x dataset size stays below 2**32 (ImageNet: 800 epochs
  x 1,281,167 images is 1.02e9).
* `epoch_loader_seed`: the seed of the DataLoader's own generator, so creating an epoch's iterator draws nothing from
  the global RNG either.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler

SEED_MIX = 0x9E3779B9  # an odd 32-bit constant (the golden ratio's): spreads the runs of nearby --seed values
LOADER_STRIDE = 1_000_003  # seed x stride + epoch: the loader generator's seed of an epoch


def augmentation_seed(seed: int, epoch: int, index: int, size: int) -> int:
    """The 32-bit seed of sample `index`'s augmentation in `epoch` of a dataset of `size` samples: one per
    (epoch, index) of a run while epochs x size < 2**32 (torch's CPU generator keeps 32 bits of a seed)."""
    return (seed * SEED_MIX + epoch * size + index) % 2**32


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (shuffled, drop_last per rank as the loader does) that can start mid-epoch.

    `set_position(epoch, start_batch)` makes the next iteration yield this rank's indices of `epoch` from batch
    `start_batch` on (`batch_size` indices per batch); `len()` is what remains, `full_batches` the whole epoch.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.start_batch = 0

    @property
    def full_batches(self) -> int:
        """Batches per epoch on this rank (the loader drops the last partial one)."""
        return self.num_samples // self.batch_size

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.full_batches:
            raise ValueError(f"start batch {start_batch} outside an epoch of {self.full_batches} batches")
        self.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(super().__iter__())
        return iter([(self.epoch, index) for index in indices[self.start_batch * self.batch_size:]])

    def __len__(self) -> int:
        return self.num_samples - self.start_batch * self.batch_size


class SeededSamples(Dataset):
    """Wraps a training dataset so that sample `index` of epoch `epoch`, asked for as `[(epoch, index)]`, draws its
    randomness from its own seed."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, samples, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # saves and restores the CPU generator only
            torch.default_generator.manual_seed(augmentation_seed(self.seed, epoch, index, len(self.dataset)))
            return self.dataset[index]


def epoch_loader_seed(seed: int, epoch: int) -> int:
    """The seed of the DataLoader's own generator in one epoch (it seeds the loader's workers)."""
    return seed * LOADER_STRIDE + epoch
