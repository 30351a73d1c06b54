"""Image tokenizers: images `[B, 3, H, W]` in [-1, 1] <-> latents `[B, C, H/stride, W/stride]`.

Two tokenizers share one interface (`encode(x) -> DiagonalGaussianDistribution`, `decode(z)`,
`posterior_from_moments(moments)`, and the attributes `embed_dim`, `stride`, `latent_scale`):

* `kl16`: MAR's pretrained KL-16 VAE (`models.vae.AutoencoderKL`, C = 16, stride 16).
* `pixel`: parameter-free space-to-depth (`PixelTokenizer`, C = channels * stride**2), for small
  experiments and CPU tests that have no pretrained VAE.

Latent convention (applied only here): the diffusion model sees `posterior.sample() * latent_scale`
(`encode_to_latents`, `latents_from_moments`), and images come back as
`decode(latents / latent_scale)` (`decode_from_latents`). The KL-16 scale is
`models.vae.KL16_LATENT_SCALE`; the pixel tokenizer uses 1.
"""
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vae import AutoencoderKL, DiagonalGaussianDistribution, load_kl16


class PixelTokenizer(nn.Module):
    """Lossless, parameter-free tokenizer: each `stride x stride` pixel patch becomes one latent vector.

    Args:
        stride: patch side in pixels (the latent grid is `H/stride x W/stride`).
        channels: image channels; `embed_dim = channels * stride**2`.

    The channel order of the latents is torch's `pixel_unshuffle`: index `c * stride**2 + i * stride + j`
    holds pixel `(i, j)` of channel `c` in the patch. The posterior is a point mass, so sampling is
    deterministic and `decode(encode(x).sample()) == x` exactly.
    """

    def __init__(self, stride: int, channels: int = 3):
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        self.stride = stride
        self.channels = channels
        self.embed_dim = channels * stride**2
        self.latent_scale = 1.0

    def posterior_from_moments(self, moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """Wrap moments `[B, 2C, h, w]` (mean, zero log variance) as the deterministic posterior."""
        return DiagonalGaussianDistribution(moments, deterministic=True)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image `[B, channels, H, W]` -> point-mass posterior over `[B, embed_dim, H/stride, W/stride]`."""
        if x.shape[1] != self.channels or x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ValueError(
                f"PixelTokenizer(stride={self.stride}, channels={self.channels}) needs images "
                f"[B, {self.channels}, H, W] with H and W divisible by {self.stride}, got {list(x.shape)}"
            )
        mean = F.pixel_unshuffle(x, self.stride)  # [B, C, H/stride, W/stride]
        moments = torch.cat([mean, torch.zeros_like(mean)], dim=1)  # [B, 2C, H/stride, W/stride]
        return self.posterior_from_moments(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents `[B, embed_dim, h, w]` -> image `[B, channels, h * stride, w * stride]` (exact inverse)."""
        if z.shape[1] != self.embed_dim:
            raise ValueError(f"PixelTokenizer expects {self.embed_dim} latent channels, got {z.shape[1]}")
        return F.pixel_shuffle(z, self.stride)  # [B, channels, H, W]


def _build_pixel(vae_path, stride: int, channels: int) -> nn.Module:
    return PixelTokenizer(stride, channels)


def _build_kl16(vae_path, stride: int, channels: int) -> nn.Module:
    if vae_path is None:
        raise ValueError("the kl16 tokenizer needs its checkpoint: pass --vae_path path/to/kl16.ckpt")
    return load_kl16(vae_path)


def _empty_kl16(stride: int, channels: int) -> nn.Module:
    with torch.device("meta"):
        return AutoencoderKL(embed_dim=16)


class TokenizerSpec(NamedTuple):
    """What building a tokenizer by name needs.

    `build(vae_path, stride, channels)` returns the module with its weights; `fixed_stride` is the only
    stride it supports (None: any); `embed_dim(stride, channels)` the latent channels it produces;
    `needs_weights` whether `build` reads `vae_path`; `build_empty(stride, channels)` a weightless module
    (meta device) that still turns cached moments into latents, for training on cached latents.
    """

    build: Callable[[Optional[Union[str, Path]], int, int], nn.Module]
    fixed_stride: Optional[int]
    embed_dim: Callable[[int, int], int]
    needs_weights: bool
    build_empty: Callable[[int, int], nn.Module]
    rgb_only: bool


TOKENIZERS: Dict[str, TokenizerSpec] = {
    # MAR's KL-16 VAE: RGB -> 16 channels at stride 16.
    "kl16": TokenizerSpec(_build_kl16, fixed_stride=16, embed_dim=lambda stride, channels: 16, needs_weights=True,
                          build_empty=_empty_kl16, rgb_only=True),
    # Parameter-free space-to-depth: channels * stride^2 latent channels.
    "pixel": TokenizerSpec(_build_pixel, fixed_stride=None, embed_dim=lambda stride, channels: channels * stride**2,
                           needs_weights=False, build_empty=lambda stride, channels: PixelTokenizer(stride, channels),
                           rgb_only=False),
}


def check_tokenizer_settings(name: str, vae_embed_dim: int, vae_stride: int, channels: int = 3) -> TokenizerSpec:
    """The spec of tokenizer `name`, after checking that the model's latent settings fit it.

    Raises:
        ValueError: unknown name, or `vae_embed_dim`/`vae_stride`/`channels` inconsistent with the tokenizer
            (the message says which flags to pass).
    """
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    spec = TOKENIZERS[name]
    if vae_stride < 1:
        raise ValueError(f"--vae_stride must be a positive integer, got {vae_stride}")
    if spec.rgb_only and channels != 3:
        raise ValueError(f"the {name} tokenizer takes RGB images only (got {channels} channels)")
    stride = spec.fixed_stride or vae_stride
    embed_dim = spec.embed_dim(stride, channels)
    if (vae_stride, vae_embed_dim) != (stride, embed_dim):
        raise ValueError(f"the {name} tokenizer with stride {stride} and {channels} image channels produces "
                         f"{embed_dim} latent channels: pass --vae_embed_dim {embed_dim} --vae_stride {stride} "
                         f"(got vae_embed_dim={vae_embed_dim}, vae_stride={vae_stride})")
    return spec


def build_tokenizer(
    name: str,
    vae_path: Optional[Union[str, Path]] = None,
    vae_embed_dim: int = 16,
    vae_stride: int = 16,
    channels: int = 3,
    with_weights: bool = True,
) -> nn.Module:
    """Build a frozen, eval-mode tokenizer by name (a key of `TOKENIZERS`).

    Args:
        vae_path: the weights file, for tokenizers that need one (`kl16.ckpt`).
        vae_embed_dim, vae_stride: the latent channels and stride the model is built for; they must be what
            the tokenizer produces (see `check_tokenizer_settings`).
        channels: image channels (3 for RGB, 1 for grayscale where the tokenizer allows it).
        with_weights: False builds the weightless module of `TokenizerSpec.build_empty` (cached training).
    """
    spec = check_tokenizer_settings(name, vae_embed_dim, vae_stride, channels)
    if not with_weights:
        return spec.build_empty(vae_stride, channels).eval().requires_grad_(False)
    return spec.build(vae_path, vae_stride, channels).eval().requires_grad_(False)


def _scaled_sample(
    tokenizer: nn.Module, posterior: DiagonalGaussianDistribution, generator: Optional[torch.Generator]
) -> torch.Tensor:
    return posterior.sample(generator) * tokenizer.latent_scale


def encode_to_latents(
    tokenizer: nn.Module, images: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [-1, 1] -> diffusion-space latents `[B, C, H/stride, W/stride]`.

    A posterior sample (noise from `generator`, or the global RNG when None) times `latent_scale`.
    """
    return _scaled_sample(tokenizer, tokenizer.encode(images), generator)


def latents_from_moments(
    tokenizer: nn.Module, moments: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Cached moments `[B, 2C, h, w]` (`encode(x).parameters`) -> diffusion-space latents `[B, C, h, w]`."""
    return _scaled_sample(tokenizer, tokenizer.posterior_from_moments(moments), generator)


def decode_from_latents(tokenizer: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion-space latents `[B, C, h, w]` -> images `[B, 3, h * stride, w * stride]`, about [-1, 1]."""
    return tokenizer.decode(latents / tokenizer.latent_scale)
