"""util.data.order: the data order and the augmentation draws as functions of (seed, epoch, index), pinned."""
import torch

from util.data.order import (
    LOADER_STRIDE,
    SEED_MIX,
    ResumableSampler,
    SeededSamples,
    augmentation_seed,
    epoch_loader_seed,
)


class Draws(torch.utils.data.Dataset):
    """Item i: a draw from the global generator (what a random crop or flip reads), and i."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(1).item(), index


def test_a_sample_draws_from_the_seed_of_seed_epoch_and_index():
    samples = SeededSamples(Draws(), seed=3)
    for epoch, index in [(0, 0), (2, 7), (799, 9)]:
        expected = torch.Generator().manual_seed((3 * SEED_MIX + epoch * 10 + index) % 2**32)
        assert samples[(epoch, index)] == (torch.rand(1, generator=expected).item(), index)
    assert samples[(0, 4)] != samples[(1, 4)]  # another epoch, another crop
    assert epoch_loader_seed(3, 5) == 3 * LOADER_STRIDE + 5


def test_every_sample_of_every_epoch_has_its_own_32_bit_seed_at_imagenet_size():
    """The seed is a 32-bit number (torch's CPU generator truncates larger ones): offset + epoch x size + index,
    one per (epoch, index) while epochs x size < 2**32. A fixed stride of 1,000,003 below ImageNet's 1,281,167
    images gave sample 1,000,003 + k of one epoch the seed of sample k of the next."""
    size, epochs = 1_281_167, 800
    assert epochs * size < 2**32
    for seed in (0, 1, 2**40):
        seeds = [augmentation_seed(seed, epoch, index, size) for epoch, index in
                 [(0, 0), (0, size - 1), (1, 0), (epochs - 1, size - 1), (0, 1_000_003)]]
        assert all(0 <= value < 2**32 for value in seeds)
        assert len(set(seeds)) == 5  # (0, 1_000_003) and (1, 0) shared one under the fixed stride
        assert (seeds[3] - seeds[0]) % 2**32 == epochs * size - 1  # consecutive: no wrap inside a run


def test_sampler_keys_carry_the_epoch_and_skip_the_batches_already_trained():
    dataset = Draws()
    ranks = [ResumableSampler(dataset, 2, rank, seed=1, batch_size=2) for rank in range(2)]
    for sampler in ranks:
        sampler.set_position(4)
    keys = [list(sampler) for sampler in ranks]
    assert all(epoch == 4 for shard in keys for epoch, _ in shard)
    assert sorted(index for shard in keys for _, index in shard) == list(range(10))  # one epoch, every sample
    ranks[0].set_position(4, start_batch=1)
    assert list(ranks[0]) == keys[0][2:] and len(ranks[0]) == 3
    ranks[0].set_position(5)
    assert [index for _, index in ranks[0]] != [index for _, index in keys[0]]  # reshuffled each epoch
