"""util.execution.memory against real steps and over whole steps: a tiny model's predicted peak against the CPU
allocator's count of the same step, checkpointing and the batch. Seconds each, so with the full suite; the unit
tests (tests/unit/execution/test_memory.py) hold the rest of the prediction's structure."""
import pytest

from models.transdiff import transdiff_tiny
from util.execution.memory import measure_step_memory, predict_step_memory

TINY = dict(img_size=16, vae_stride=2, vae_embed_dim=12, class_num=3, buffer_size=4)


def tiny(**overrides):
    return lambda: transdiff_tiny(**TINY, **overrides)


@pytest.mark.parametrize("overrides,precision", [
    ({}, "fp32"),
    ({}, "bf16"),
    ({"mrar": True, "patch_size": 2}, "bf16"),
    ({"grad_checkpointing": True}, "fp32"),
], ids=["1-step-fp32", "1-step-bf16", "mrar-bf16", "checkpointed-fp32"])
def test_the_prediction_with_cpu_kernels_is_the_cpu_allocators_peak(overrides, precision):
    """The issue asks for 15 %; with the CPU's kernels the two counts agree closely (docs/gpu.md), so the test
    holds them to 2 %."""
    predicted = predict_step_memory(tiny(**overrides), 4, precision, kernels="cpu")
    measured = measure_step_memory(tiny(**overrides), 4, precision)
    assert predicted.peak == pytest.approx(measured.peak, rel=0.02)
    assert predicted.resident == pytest.approx(measured.resident, rel=0.01)


def test_checkpointing_lowers_the_activations_and_nothing_else():
    def transient(memory):
        return memory.peak - memory.resident

    plain, first_block, every_block = (predict_step_memory(tiny(grad_checkpointing=n), 8) for n in (False, 1, True))
    assert transient(every_block) < transient(first_block) < transient(plain)
    assert every_block.resident == first_block.resident == plain.resident


def test_the_peak_grows_linearly_with_the_batch():
    two, four, eight = (predict_step_memory(tiny(), batch).peak for batch in (2, 4, 8))
    assert eight - four == pytest.approx(2 * (four - two), rel=0.05)
