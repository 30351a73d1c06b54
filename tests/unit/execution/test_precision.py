"""util.execution.precision: `auto` resolved once, the grad scaler only for fp16, the VAE decode never in fp16,
and --tf32 touching matrix products only (CUDA mocked where a GPU is needed)."""
import pytest
import torch

from models.tokenizers import PixelTokenizer, decode_from_latents
from util.execution.precision import (
    DECODE_CHUNK,
    autocast_context,
    configure_cuda_backends,
    decode_images,
    decode_precision,
    resolve_precision,
    uses_grad_scaler,
)


@pytest.mark.parametrize("device_type,native_bf16,expected", [
    ("cuda", True, "bf16"),    # Ampere and newer
    ("cuda", False, "fp32"),   # V100, T4: fp16 only when asked
    ("cpu", True, "fp32"),
    ("mps", False, "fp32"),
])
def test_auto_is_bf16_only_on_a_gpu_with_native_bfloat16(monkeypatch, device_type, native_bf16, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native_bf16)
    assert resolve_precision("auto", device_type) == expected
    assert asked in ([], [False])  # emulated bfloat16 (pre-Ampere) does not count


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_on_any_device(requested):
    assert resolve_precision(requested, "cpu") == requested


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cuda")


def test_grad_scaler_for_fp16_only_and_the_decode_never_in_fp16():
    assert [uses_grad_scaler(p) for p in ("fp32", "bf16", "fp16")] == [False, False, True]
    assert [decode_precision(p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp32"]


def test_autocast_context_per_precision():
    with autocast_context("fp32", "cpu")():
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("bf16", "cpu")():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_tf32_flag_sets_matmuls_only_and_cudnn_picks_kernels():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
        configure_cuda_backends(tf32=False)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cudnn.benchmark is True
        configure_cuda_backends(tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


class RecordingTokenizer(PixelTokenizer):
    """The pixel tokenizer, recording the batch size and the autocast state of every decode call."""

    def __init__(self):
        super().__init__(stride=2)
        self.calls = []

    def decode(self, z):
        self.calls.append((z.shape[0], torch.is_autocast_enabled("cpu")))
        return super().decode(z)


@pytest.mark.parametrize("precision,autocast", [("fp16", False), ("fp32", False), ("bf16", True)])
def test_decode_runs_in_chunks_in_the_decode_precision(precision, autocast):
    tokenizer = RecordingTokenizer()
    latents = torch.randn(DECODE_CHUNK * 2 + 3, 12, 4, 4)
    with autocast_context(precision, "cpu")():  # the sampling context must not leak into the decode
        images = decode_images(tokenizer, latents, precision, torch.device("cpu"))
    assert tokenizer.calls == [(DECODE_CHUNK, autocast), (DECODE_CHUNK, autocast), (3, autocast)]
    assert torch.equal(images, decode_from_latents(PixelTokenizer(stride=2), latents))
