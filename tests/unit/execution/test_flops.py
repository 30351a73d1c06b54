"""util.execution.flops: model FLOPs counted on the meta device, the peaks of known GPUs, MFU."""
import pytest
import torch

from models.transdiff import transdiff_base, transdiff_tiny
from util.execution.flops import Throughput, peak_flops, training_flops_per_image

TINY = dict(img_size=16, vae_stride=2, vae_embed_dim=12, class_num=3, buffer_size=4)


def test_transdiff_b_training_image_is_1_04_tflop():
    """The figure the GPU docs quote: TransDiff-B, 256 px, diffusion_batch_mul 4, forward and backward."""
    assert training_flops_per_image(lambda: transdiff_base(img_size=256, diffusion_batch_mul=4)) == pytest.approx(
        1.038e12, rel=1e-3)


def test_flops_per_image_do_not_depend_on_the_counting_batch_and_grow_by_one_decoder_pass_per_copy():
    one, two, three = (training_flops_per_image(lambda mul=mul: transdiff_tiny(**TINY, diffusion_batch_mul=mul))
                       for mul in (1, 2, 3))
    assert training_flops_per_image(lambda: transdiff_tiny(**TINY, diffusion_batch_mul=1), batch=4) == one
    assert three - two == two - one > 0  # the encoder once per image, the decoder once per copy


def test_counting_draws_nothing_from_the_generators():
    """main.py counts after restoring a checkpoint's generator states: a draw here would break bit-exact resume."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    training_flops_per_image(lambda: transdiff_tiny(**TINY, attn_dropout=0.1, proj_dropout=0.1))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name,precision,tf32,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989e12),
    ("NVIDIA H100 PCIe", "bf16", False, 756e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5e12),
    ("NVIDIA H200", "fp16", False, 989e12),
    ("NVIDIA GeForce RTX 4090", "bf16", False, None),
])
def test_peaks_of_known_gpus(monkeypatch, name, precision, tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), precision, tf32) == expected


def test_a_given_peak_wins_and_a_cpu_has_none():
    assert peak_flops(torch.device("cpu"), "fp32", False) is None
    assert peak_flops(torch.device("cpu"), "fp32", False, peak_tflops=2.0) == 2e12


def test_throughput_arithmetic():
    rate = Throughput.of(images=64, seconds=2.0, flops_per_image=1e12, peak=64e12)
    assert rate == Throughput(32.0, 32e12, 0.5)
    assert Throughput.of(images=64, seconds=2.0, flops_per_image=1e12, peak=None).mfu is None
