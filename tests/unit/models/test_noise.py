"""models.noise: each source draws what it says, in the dtype and on the device asked, and refuses a batch that does
not match its generators. The CUDA paths (pinned host memory, asynchronous copies) are held by tests/gpu."""
import numpy as np
import pytest
import torch

from models import noise
from models.noise import PerImageNoise, PhiloxNoise, TorchNoise, as_noise_source, to_device

SHAPE = (2, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_torch_noise_is_its_generators_draw_in_the_dtype_asked(dtype):
    draw = TorchNoise(torch.Generator().manual_seed(3)).randn((4, *SHAPE), device="cpu", dtype=dtype)
    assert draw.dtype == dtype
    assert torch.equal(draw, torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=dtype))
    torch.manual_seed(5)
    global_draw = TorchNoise().randn((4, *SHAPE), device="cpu", dtype=dtype)
    torch.manual_seed(5)
    assert global_draw.dtype == dtype and torch.equal(global_draw, torch.randn((4, *SHAPE), dtype=dtype))


def test_every_source_puts_its_draw_on_the_device_asked():
    sources = [TorchNoise(), TorchNoise(torch.Generator().manual_seed(0)), PerImageNoise.from_seeds([0, 1]),
               PhiloxNoise([0, 1])]
    for source in sources:  # the meta device stands for any device other than the generators' own
        draw = source.randn((2, *SHAPE), device="meta", dtype=torch.float32)
        assert draw.device.type == "meta" and draw.shape == (2, *SHAPE), type(source).__name__
    assert to_device(torch.ones(2), "meta").device.type == "meta"
    host = torch.ones(2)
    assert to_device(host, "cpu") is host  # nothing copied where nothing moves


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_per_image_noise_row_i_is_generator_i_in_the_dtype_asked(dtype):
    draw = PerImageNoise.from_seeds([4, 9]).randn((2, *SHAPE), device="cpu", dtype=dtype)
    assert draw.dtype == dtype
    for row, seed in zip(draw, (4, 9), strict=True):
        assert torch.equal(row, torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_philox_noise_is_drawn_in_float32_then_cast(dtype):
    draw = PhiloxNoise([12]).randn((1, *SHAPE), device="cpu", dtype=dtype)
    expected = np.random.Generator(np.random.Philox(key=12)).standard_normal(SHAPE, dtype=np.float32)
    assert draw.dtype == dtype and torch.equal(draw[0], torch.from_numpy(expected).to(dtype))


def test_philox_draws_float32_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        draw = PhiloxNoise([12]).randn((1, *SHAPE), device="cpu", dtype=torch.float16)
    finally:
        torch.set_default_dtype(default)
    expected = np.random.Generator(np.random.Philox(key=12)).standard_normal(SHAPE, dtype=np.float32)
    assert draw.dtype == torch.float16 and torch.equal(draw[0], torch.from_numpy(expected).half())


@pytest.mark.parametrize("source", [PerImageNoise.from_seeds([0, 1]), PhiloxNoise([0, 1])])
def test_a_batch_other_than_the_generators_is_refused(source):
    with pytest.raises(ValueError, match=r"^draw of batch 3 but 2 per-image generators$"):
        source.randn((3, *SHAPE), device="cpu", dtype=torch.float32)


def test_what_counts_as_a_noise_source():
    assert as_noise_source(None).generator is None
    generator = torch.Generator()
    assert as_noise_source(generator).generator is generator
    assert isinstance(as_noise_source([generator]), PerImageNoise) and isinstance(as_noise_source((generator,)),
                                                                                    PerImageNoise)
    philox = PhiloxNoise([1])
    assert as_noise_source(philox) is philox
    with pytest.raises(TypeError, match="^cannot draw noise from int$"):
        as_noise_source(3)


# --- the way to a GPU, with the CUDA calls recorded (tests/gpu runs them for real) --------------------------------

class Draw:
    """A stand-in for a drawn tensor that records what `to_device` does with it."""

    def __init__(self, device="cpu", pinned=False):
        self.device, self.pinned, self.calls = torch.device(device), pinned, []

    def is_pinned(self):
        return self.pinned

    def pin_memory(self):
        self.calls.append("pin")
        self.pinned = True
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", device, non_blocking))
        return self


@pytest.mark.parametrize("where, pinned, device, calls", [
    ("cpu", False, "cuda:1", ["pin", ("to", torch.device("cuda", 1), True)]),  # pinned, then copied asynchronously
    ("cpu", True, "cuda", [("to", torch.device("cuda"), True)]),
    ("cuda:0", False, "cuda:1", [("to", torch.device("cuda", 1), True)]),  # already on a GPU: nothing to pin
    ("cpu", False, "cpu", [("to", torch.device("cpu"), True)]),
])
def test_a_host_draw_bound_for_a_gpu_is_pinned_first(where, pinned, device, calls):
    draw = Draw(where, pinned)
    assert to_device(draw, device) is draw and draw.calls == calls


@pytest.fixture
def host_buffers(monkeypatch):
    """Records the `pin_memory` of every `torch.empty` and the device each draw is sent to."""
    record = {"pinned": [], "sent_to": []}
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        record["pinned"].append(pin_memory)
        return real_empty(*args, **kwargs)

    def send(draw, device):
        record["sent_to"].append(device)
        return draw

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(noise, "to_device", send)
    return record


@pytest.mark.parametrize("source", [PerImageNoise.from_seeds([0, 1]), PhiloxNoise([0, 1])])
@pytest.mark.parametrize("device, pinned", [("cuda:0", True), ("cpu", False)])
def test_per_image_draws_go_into_pinned_host_memory_only_for_a_gpu(host_buffers, source, device, pinned):
    draw = source.randn((2, *SHAPE), device=device, dtype=torch.bfloat16)
    assert host_buffers == {"pinned": [pinned], "sent_to": [device]} and draw.dtype == torch.bfloat16
    assert draw.shape == (2, *SHAPE)


class DeviceGenerator:
    """A stand-in for a generator of a GPU."""

    def __init__(self, value):
        self.value, self.device = value, torch.device("cuda", value)


def test_generators_on_a_device_draw_there(monkeypatch):
    """A generator that is not the CPU's draws on its own device; per image, the rows then move to the device
    asked."""
    drawn = []

    def randn(shape, *, generator, device, dtype):
        drawn.append((shape, device, dtype))
        return torch.full(shape, float(generator.value), dtype=dtype)

    monkeypatch.setattr(torch, "randn", randn)
    draw = PerImageNoise([DeviceGenerator(1), DeviceGenerator(2)]).randn((2, *SHAPE), device="meta",
                                                                        dtype=torch.float64)
    assert drawn == [(SHAPE, torch.device("cuda", 1), torch.float64), (SHAPE, torch.device("cuda", 2), torch.float64)]
    assert draw.device.type == "meta" and draw.shape == (2, *SHAPE) and draw.dtype == torch.float64
    drawn.clear()
    whole = TorchNoise(DeviceGenerator(3)).randn((2, *SHAPE), device="meta", dtype=torch.float16)
    assert drawn == [((2, *SHAPE), torch.device("cuda", 3), torch.float16)] and whole.device.type == "meta"
