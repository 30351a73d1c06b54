"""The KL-16 image tokenizer: MAR's `AutoencoderKL` (the LDM KL autoencoder at stride 16).

The network maps an image `[B, 3, H, W]` in [-1, 1] to a diagonal Gaussian posterior over latents
`[B, 16, H/16, W/16]` and decodes latents back to an image. The architecture (module names included)
follows MAR's `models/vae.py`, so MAR's `kl16.ckpt` (`{'model': state_dict}`) loads with
`strict=True`:

* encoder: `conv_in`, five levels (`ch * ch_mult` channels, 2 ResNet blocks each, stride-2 downsample
  between levels), self-attention after every block of the last (16x16 at 256 px) level, a middle
  ResNet/attention/ResNet stack, GroupNorm(32) + swish, `conv_out` to `2 * embed_dim` moments;
* `quant_conv` (1x1) on the moments, `post_quant_conv` (1x1) on the latents;
* decoder: the mirror image with 3 ResNet blocks per level, nearest-neighbour upsampling and attention
  only in the middle (MAR dropped the up-path attention of LDM to save memory).

Latent scale convention (owned here): the diffusion model sees `posterior.sample() * KL16_LATENT_SCALE`
and decoding divides by it. `models/tokenizers.py` applies the convention (`encode_to_latents`,
`decode_from_latents`); nothing else multiplies by the number.
"""
import pickle
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

KL16_LATENT_SCALE = 0.2325
"""Multiplier from KL-16 posterior samples to the latents the diffusion model sees (MAR's value,
chosen so the scaled latents have roughly unit variance). Decoding divides latents by it first."""

KL16_DOWNLOAD_URL = (
    "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt"
    "?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=0"
)
"""Where MAR's README points for `kl16.ckpt`."""

_GROUPNORM_GROUPS = 32
_GROUPNORM_EPS = 1e-6
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0
_NUM_KEYS_SHOWN = 5


def _group_norm(channels: int) -> nn.GroupNorm:
    """The LDM normalisation layer: GroupNorm with 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(_GROUPNORM_GROUPS, channels, eps=_GROUPNORM_EPS, affine=True)


class DiagonalGaussianDistribution:
    """A diagonal Gaussian over latents, parameterised by concatenated `[mean, logvar]` moments.

    Args:
        parameters: moments `[B, 2C, h, w]`; the first C channels are the mean, the last C the log
            variance (clamped to [-30, 20]).
        deterministic: if True the distribution is a point mass at the mean: `std` is zero and
            `sample()` returns the mean itself.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = parameters.chunk(2, dim=1)  # 2 x [B, C, h, w]
        self.logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)
        self.std = torch.zeros_like(self.mean) if deterministic else torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw `mean + std * eps`, with `eps` from `generator` (the global RNG when None).

        The noise is drawn on the generator's device and then moved to the mean's, so a CPU generator
        gives the same sample on every device.
        """
        if self.deterministic:
            return self.mean
        noise_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, swish, 3x3 conv) twice, 1x1 shortcut if widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, H, W]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        # q, k, v: [B, 1, H*W, C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # [B, C, H, W]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding one zero row/column at the end."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parity: LDM pads asymmetrically (right and bottom only), which a Conv2d padding cannot express.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class MidBlock(nn.Module):
    """The bottleneck stack shared by encoder and decoder: ResNet, attention, ResNet."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image `[B, in_channels, H, W]` -> moments `[B, 2 * z_channels, H / 2**(L-1), W / 2**(L-1)]`.

    Args:
        ch: base width; level i has `ch * ch_mult[i]` channels.
        ch_mult: width multipliers, one per level (L levels, L - 1 downsamplings).
        num_res_blocks: ResNet blocks per level.
        z_channels: latent channels; the output has twice as many (mean and log variance).
        in_channels: image channels.

    Self-attention follows each ResNet block of the last level only (LDM's `attn_resolutions=(16,)` at
    its nominal 256 px resolution).
    """

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 16,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            is_last = level == len(ch_mult) - 1
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if is_last:
                    stage.attn.append(AttnBlock(block_in))
            stage.downsample = nn.Identity() if is_last else Downsample(block_in)
            self.down.append(stage)
        self.mid = MidBlock(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            h = stage.downsample(h)  # [B, C, H/2, W/2] (unchanged at the last level)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2 * z_channels, h, w]


class Decoder(nn.Module):
    """Latents `[B, z_channels, h, w]` -> image `[B, out_channels, h * 2**(L-1), w * 2**(L-1)]`.

    Args:
        ch, ch_mult: as in `Encoder`; the decoder starts at `ch * ch_mult[-1]` channels.
        num_res_blocks: the decoder uses `num_res_blocks + 1` ResNet blocks per level.
        z_channels: latent channels.
        out_channels: image channels.
    """

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 16,
        out_channels: int = 3,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
            stage.upsample = Upsample(block_in) if level != 0 else nn.Identity()
            stages.append(stage)
        # `up[i]` is the level at the same resolution as encoder level i, so it runs in reverse order.
        self.up = nn.ModuleList(reversed(stages))
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, ch * ch_mult[-1], h, w]
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            h = stage.upsample(h)  # [B, C, 2h, 2w] (unchanged at level 0)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_channels, H, W]


class AutoencoderKL(nn.Module):
    """MAR's KL autoencoder; the default arguments give KL-16 (66,456,019 parameters).

    Args:
        embed_dim: latent channels C.
        ch_mult: per-level width multipliers; the stride is `2 ** (len(ch_mult) - 1)`.
        ch: base width (128 for the released KL-16; smaller values only for tests).

    Attributes:
        embed_dim: latent channels C.
        stride: image pixels per latent position along each side.
        latent_scale: `KL16_LATENT_SCALE`, applied by `models.tokenizers`.
    """

    def __init__(
        self,
        embed_dim: int = 16,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        ch: int = 128,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.stride = 2 ** (len(ch_mult) - 1)
        self.latent_scale = KL16_LATENT_SCALE
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, z_channels=embed_dim)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def posterior_from_moments(self, moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """Wrap moments `[B, 2C, h, w]` (from `encode(x).parameters`, e.g. cached) as the posterior."""
        return DiagonalGaussianDistribution(moments)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image `[B, 3, H, W]` in [-1, 1] -> posterior over `[B, C, H/stride, W/stride]`."""
        moments = self.quant_conv(self.encoder(x))  # [B, 2C, H/stride, W/stride]
        return self.posterior_from_moments(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents `[B, C, h, w]` -> image `[B, 3, h * stride, w * stride]` (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z))

    @classmethod
    def from_checkpoint(
        cls,
        path: Union[str, Path],
        map_location: Union[str, torch.device] = "cpu",
        **config,
    ) -> "AutoencoderKL":
        """Build an `AutoencoderKL(**config)` on `map_location`, load `path` strictly, freeze it.

        `path` holds `{'model': state_dict}` or a bare state_dict. The model is built without random
        initialisation (on the meta device, checked against the file, then given uninitialised storage),
        so every value comes from the file. The result is in eval mode with `requires_grad=False`.

        Raises:
            FileNotFoundError: `path` does not exist (the message says where to get kl16.ckpt).
            ValueError: the file is not a torch checkpoint of tensors, or its keys or shapes differ from
                this model's (a few of each are listed).
        """
        with torch.device("meta"):
            model = cls(**config)
        state_dict = _read_state_dict(path, map_location)
        _check_state_dict(model.state_dict(), state_dict, path)
        model.to_empty(device=map_location)
        model.load_state_dict(state_dict, strict=True)
        return model.eval().requires_grad_(False)


def load_kl16(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> AutoencoderKL:
    """Load MAR's KL-16 tokenizer (`kl16.ckpt`) as a frozen, eval-mode `AutoencoderKL`."""
    return AutoencoderKL.from_checkpoint(path, map_location)


def _read_state_dict(path: Union[str, Path], map_location: Union[str, torch.device]) -> Mapping[str, torch.Tensor]:
    """Read a tensor state_dict from `path`, unwrapping `{'model': ...}`; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VAE checkpoint not found: '{path}'. Download MAR's KL-16 tokenizer (kl16.ckpt) from "
            f"{KL16_DOWNLOAD_URL} (the link in MAR's README) and pass its path with --vae_path, "
            "or use --tokenizer pixel to experiment without a pretrained VAE."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"'{path}' is not a readable torch checkpoint: foreign bytes, a truncated file, or pickled "
                         "Python objects, which are never unpickled") from None
    except Exception as error:  # torch.load fails on foreign files with many types (IndexError, EOFError, ...)
        raise ValueError(f"'{path}' is not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(checkpoint, Mapping) and "model" in checkpoint:
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"'{path}' does not hold a VAE state_dict: expected {{'model': state_dict}} or a state_dict "
            f"of tensors, got {type(checkpoint).__name__}"
        )
    bad = next((key for key, value in checkpoint.items() if value.is_floating_point() and not value.isfinite().all()),
               None)
    if bad is not None:
        raise ValueError(f"'{path}': tensor {bad} holds non-finite values (NaN or infinity); the file is corrupt")
    return checkpoint


def _check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], path: Union[str, Path]
) -> None:
    """Raise a ValueError listing a few missing, unexpected and wrongly shaped keys, if any."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k} {tuple(found[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    problems = [
        f"{len(items)} {label} key(s), e.g. {', '.join(items[:_NUM_KEYS_SHOWN])}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", mismatched))
        if items
    ]
    if problems:
        raise ValueError(
            f"'{path}' does not match the VAE architecture: " + "; ".join(problems)
            + ". Is it MAR's KL-16 checkpoint (kl16.ckpt)?"
        )
