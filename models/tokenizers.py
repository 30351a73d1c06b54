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
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vae import DiagonalGaussianDistribution, load_kl16

TOKENIZERS = ("kl16", "pixel")
"""Names accepted by `build_tokenizer` (use as argparse `choices`)."""

_KL16_EMBED_DIM = 16
_KL16_STRIDE = 16


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


def build_tokenizer(
    name: str,
    vae_path: Optional[Union[str, Path]] = None,
    vae_embed_dim: int = _KL16_EMBED_DIM,
    vae_stride: int = _KL16_STRIDE,
    channels: int = 3,
) -> nn.Module:
    """Build a frozen, eval-mode tokenizer by name.

    Args:
        name: one of `TOKENIZERS`.
        vae_path: the KL-16 checkpoint (`kl16.ckpt`); required for `kl16`, ignored by `pixel`.
        vae_embed_dim: latent channels C the model is built for; must be what the tokenizer produces
            (16 for `kl16`, `channels * vae_stride**2` for `pixel`).
        vae_stride: pixels per latent position along each side (16 for `kl16`; any positive integer
            dividing the image size for `pixel`).
        channels: image channels for `pixel` (3 for RGB, 1 for grayscale); `kl16` takes RGB only.

    Raises:
        ValueError: unknown name, or `vae_embed_dim`/`vae_stride`/`channels` inconsistent with the
            tokenizer (the message says which value to pass).
    """
    if name == "pixel":
        tokenizer = PixelTokenizer(vae_stride, channels)
        if vae_embed_dim != tokenizer.embed_dim:
            raise ValueError(
                f"the pixel tokenizer with stride {vae_stride} and {channels} image channels produces "
                f"{tokenizer.embed_dim} latent channels: pass --vae_embed_dim {tokenizer.embed_dim} "
                f"(got {vae_embed_dim})"
            )
    elif name == "kl16":
        if vae_embed_dim != _KL16_EMBED_DIM or vae_stride != _KL16_STRIDE or channels != 3:
            raise ValueError(
                f"the kl16 tokenizer maps RGB images to {_KL16_EMBED_DIM} latent channels at stride "
                f"{_KL16_STRIDE}: pass --vae_embed_dim {_KL16_EMBED_DIM} --vae_stride {_KL16_STRIDE} "
                f"(got vae_embed_dim={vae_embed_dim}, vae_stride={vae_stride}, channels={channels})"
            )
        if vae_path is None:
            raise ValueError("the kl16 tokenizer needs its checkpoint: pass --vae_path path/to/kl16.ckpt")
        tokenizer = load_kl16(vae_path)
    else:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    return tokenizer.eval().requires_grad_(False)


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
