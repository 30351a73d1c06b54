"""Tokenizers: the pixel space-to-depth tokenizer, the factory and the latent scaling helpers."""
import pytest
import torch

import models.tokenizers as tokenizers
from models.tokenizers import (
    PixelTokenizer,
    build_tokenizer,
    decode_from_latents,
    encode_to_latents,
    latents_from_moments,
)
from models.vae import KL16_LATENT_SCALE, AutoencoderKL

SMALL_CH = 32


def _images(batch=2, channels=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator) * 2 - 1  # [B, C, H, W] in [-1, 1]


@pytest.fixture(scope="module")
def ch32_checkpoint(tmp_path_factory, ch32_state_dict):
    path = tmp_path_factory.mktemp("vae") / "kl16_ch32.ckpt"
    torch.save({"model": ch32_state_dict}, path)
    return path


@pytest.fixture(scope="module")
def small_kl(ch32_checkpoint):
    return AutoencoderKL.from_checkpoint(ch32_checkpoint, ch=SMALL_CH)


@pytest.mark.parametrize("stride", [1, 2, 4, 16])
def test_pixel_round_trip_is_exact(stride):
    tokenizer = PixelTokenizer(stride)
    images = _images()
    assert torch.equal(tokenizer.decode(tokenizer.encode(images).sample()), images)


@pytest.mark.parametrize("stride", [2, 4, 16])
def test_pixel_shapes(stride):
    tokenizer = PixelTokenizer(stride)
    posterior = tokenizer.encode(_images(size=64))
    assert tokenizer.embed_dim == 3 * stride**2
    assert posterior.mean.shape == (2, 3 * stride**2, 64 // stride, 64 // stride)
    assert posterior.parameters.shape == (2, 6 * stride**2, 64 // stride, 64 // stride)


def test_pixel_channel_order_is_space_to_depth():
    stride, images = 2, _images(batch=1, size=8)
    latents = PixelTokenizer(stride).encode(images).mean
    c, i, j, h, w = 1, 1, 0, 3, 2
    assert latents[0, c * stride**2 + i * stride + j, h, w] == images[0, c, h * stride + i, w * stride + j]


def test_pixel_grayscale():
    tokenizer = PixelTokenizer(2, channels=1)
    images = _images(channels=1)
    latents = tokenizer.encode(images).mean
    assert tokenizer.embed_dim == 4 and latents.shape == (2, 4, 16, 16)
    assert torch.equal(tokenizer.decode(latents), images)


def test_pixel_posterior_is_deterministic():
    posterior = PixelTokenizer(4).encode(_images())
    assert torch.equal(posterior.std, torch.zeros_like(posterior.mean))
    assert torch.equal(posterior.sample(torch.Generator().manual_seed(1)), posterior.mean)
    assert torch.equal(posterior.sample(), posterior.mean)


def test_pixel_tokenizer_has_no_parameters():
    assert list(PixelTokenizer(16).parameters()) == [] and PixelTokenizer(16).state_dict() == {}


def test_pixel_rejects_indivisible_images():
    with pytest.raises(ValueError, match="divisible by 16, got \\[2, 3, 40, 40\\]"):
        PixelTokenizer(16).encode(_images(size=40))


def test_pixel_decode_rejects_wrong_channels():
    with pytest.raises(ValueError, match="expects 12 latent channels, got 16"):
        PixelTokenizer(2).decode(torch.zeros(1, 16, 4, 4))


def test_pixel_latent_helpers_round_trip():
    tokenizer = build_tokenizer("pixel", vae_embed_dim=48, vae_stride=4)
    images = _images()
    latents = encode_to_latents(tokenizer, images, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 48, 8, 8)
    assert torch.equal(decode_from_latents(tokenizer, latents), images)
    moments = tokenizer.encode(images).parameters
    assert torch.equal(latents_from_moments(tokenizer, moments), latents)


def test_build_pixel_embed_dim_mismatch_says_what_to_pass():
    with pytest.raises(ValueError, match="pass --vae_embed_dim 12 --vae_stride 2 \\(got vae_embed_dim=16"):
        build_tokenizer("pixel", vae_embed_dim=16, vae_stride=2)


def test_build_pixel_ignores_vae_path_and_is_frozen(tmp_path):
    tokenizer = build_tokenizer("pixel", vae_path=tmp_path / "absent.ckpt", vae_embed_dim=768, vae_stride=16)
    assert isinstance(tokenizer, PixelTokenizer) and not tokenizer.training
    assert (tokenizer.embed_dim, tokenizer.stride, tokenizer.latent_scale) == (768, 16, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vae_embed_dim": 4, "vae_stride": 16}, "pass --vae_embed_dim 16 --vae_stride 16"),
        ({"vae_embed_dim": 16, "vae_stride": 8}, "got vae_embed_dim=16, vae_stride=8"),
        ({"channels": 1}, "RGB images only"),
        ({}, "pass --vae_path"),
    ],
)
def test_build_kl16_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tokenizer("kl16", **kwargs)


def test_build_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown tokenizer 'kl8'; choose one of kl16, pixel"):
        build_tokenizer("kl8")


def test_build_kl16_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        build_tokenizer("kl16", vae_path=tmp_path / "absent.ckpt")


def test_build_kl16_loads_checkpoint_file(monkeypatch, ch32_checkpoint):
    # The real kl16.ckpt is 266 MB; swap in the small-width architecture but keep the factory's path.
    monkeypatch.setattr(tokenizers, "load_kl16", lambda path: AutoencoderKL.from_checkpoint(path, ch=SMALL_CH))
    tokenizer = build_tokenizer("kl16", vae_path=ch32_checkpoint)
    assert isinstance(tokenizer, AutoencoderKL) and not tokenizer.training
    assert all(not p.requires_grad for p in tokenizer.parameters())
    assert (tokenizer.embed_dim, tokenizer.stride, tokenizer.latent_scale) == (16, 16, KL16_LATENT_SCALE)


def test_kl_latent_helpers_apply_the_scale(small_kl):
    images = _images(batch=1, size=64)
    with torch.no_grad():
        latents = encode_to_latents(small_kl, images, torch.Generator().manual_seed(5))
        posterior = small_kl.encode(images)
        expected = posterior.sample(torch.Generator().manual_seed(5)) * KL16_LATENT_SCALE
        cached = latents_from_moments(small_kl, posterior.parameters, torch.Generator().manual_seed(5))
        decoded = decode_from_latents(small_kl, latents)
        expected_decoded = small_kl.decode(latents / KL16_LATENT_SCALE)
    assert latents.shape == (1, 16, 4, 4)
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)
    torch.testing.assert_close(cached, expected, atol=0, rtol=0)
    torch.testing.assert_close(decoded, expected_decoded, atol=0, rtol=0)
    assert not torch.equal(posterior.std, torch.zeros_like(posterior.std))
