"""TransDiff: an AR transformer ("encoder") that turns a class label (and, with MRAR, earlier images)
into condition tokens, and a diffusion decoder that denoises the whole image latent while cross-attending
to them. One class covers both modes:

* 1-step AR (`mrar=False`): encoder input `[class × buffer | mask_token × L]`, full attention; the image
  never enters the encoder, so the condition depends on the label alone.
* MRAR (`mrar=True`, patch_size p >= 2): `num_stages = p²` same-class images. The encoder sees
  `[class × buffer | mask(tokens_per_stage) | ref_0 | ... | ref_{S-2}]` (references are p×p-patched
  latents) under a block-causal mask; image k is denoised (patch 1 tokens) from the first
  `tokens_per_stage·(k+1)` condition tokens. Sampling chains the stages, feeding each output back as the
  next reference; the last stage's image is the result.

Inputs are latents already multiplied by the tokenizer's `latent_scale` (see `models.tokenizers`).
Classifier-free guidance layout: the doubled batch is `[cond; uncond]`, the unconditional embedding is the
learned `fake_latent`.

Shapes: B batch, D width, C latent channels, h × w latent grid; L condition tokens, Ls = `tokens_per_stage`,
S = `num_stages`, buf = `buffer_size`; encoder reference tokens have width C·p² (p = `patch_size`); the
decoder sees N = `diff_seqlen` tokens of width `decoder_token_dim`, written C (it is C·p² for a 1-step
model with p > 1; MRAR decodes at patch 1).
"""
from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.attention import EncoderBlock, checkpointed
from models.diffdecoder import DiffusionDecoder, PreparedCondition
from models.flow import TIME_SCALE, FlowLossOutput, flow_matching_loss
from models.noise import as_noise_source
from models.samplers import VelocityFn, run_sampler

# Parity: the 1-step encoder holds at most 256 condition tokens (the 16x16 grid of a 256 px image); the 512 px
# model is the 256 px model finetuned with a larger decoder (1024 tokens) cross-attending to the same 256.
MAX_COND_TOKENS = 256


class TrainingOutput(NamedTuple):
    loss: torch.Tensor             # [] mean over stages of the mean squared error
    stage_losses: torch.Tensor     # [S]
    z: torch.Tensor                # [B, L, D] condition tokens (encoder output + position embedding)
    timesteps: torch.Tensor        # [S, B·mul] int64
    x_t: torch.Tensor              # [S, B·mul, N, C] decoder inputs
    prediction: torch.Tensor       # [S, B·mul, N, C] predicted velocities


def drop_labels(class_embedding: torch.Tensor, fake_latent: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the rows of `class_embedding` [B, D] where `drop` [B] (bool) by `fake_latent` [1, D]."""
    return torch.where(drop[:, None], fake_latent, class_embedding)  # [B, D]


def block_causal_mask(block_sizes: Sequence[int]) -> torch.Tensor:
    """bool [1, 1, T, T], True where a query may attend: a query in block i sees key blocks 0..i."""
    block_ids = torch.tensor([block for block, size in enumerate(block_sizes) for _ in range(size)])  # [T]
    return (block_ids[None, :] <= block_ids[:, None])[None, None]  # [1, 1, T, T]


class TransDiff(nn.Module):
    def __init__(self, img_size: int = 256, patch_size: int = 1,
                 encoder_embed_dim: int = 1024, encoder_depth: int = 16, encoder_num_heads: int = 16,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 vae_embed_dim: int = 16, label_drop_prob: float = 0.1, class_num: int = 1000,
                 attn_dropout: float = 0.1, proj_dropout: float = 0.1, buffer_size: int = 64,
                 num_sampling_steps: Union[int, str] = 100, diffusion_batch_mul: int = 4,
                 grad_checkpointing: Union[bool, int] = False, diffloss_w: Optional[int] = None,
                 mrar: bool = False, vae_stride: int = 16):
        """Keyword arguments are the original's, plus:

        mrar: multi-reference autoregression (needs patch_size >= 2; the released models use 2).
        vae_stride: downsampling factor of the tokenizer (16 for KL-16; the pixel tokenizer's stride).
        diffloss_w: legacy decoder width flag of the original README; must equal decoder_embed_dim.
        grad_checkpointing: the original's bool (every block recomputes its activations in the backward pass), or
            an int N: the first N blocks of the encoder and the first N of the decoder.
        num_sampling_steps: default step count of `samples` (the original stored but ignored it).
        """
        super().__init__()
        if diffloss_w is not None and diffloss_w != decoder_embed_dim:
            raise ValueError(f"--diffloss_w {diffloss_w} must equal the decoder width {decoder_embed_dim}")
        if encoder_embed_dim != decoder_embed_dim:
            raise ValueError("encoder and decoder widths must be equal (every released config has them equal; "
                             f"got {encoder_embed_dim} and {decoder_embed_dim})")
        if img_size % vae_stride:
            raise ValueError(f"img_size {img_size} is not divisible by the tokenizer stride {vae_stride}")
        latent_size = img_size // vae_stride
        if latent_size % patch_size:
            raise ValueError(f"latent grid {latent_size} ({img_size}/{vae_stride}) is not divisible by "
                             f"patch_size {patch_size}")
        if mrar and patch_size < 2:
            raise ValueError("MRAR needs --patch_size 2 (references are 2x2-patched latents); patch_size 1 "
                             "would leave a single stage with no block-causal structure")

        self.img_size = img_size
        self.vae_stride = vae_stride
        self.vae_embed_dim = vae_embed_dim
        self.patch_size = patch_size
        self.mrar = mrar
        self.latent_size = latent_size
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.buffer_size = buffer_size
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul
        self.num_sampling_steps = int(num_sampling_steps)
        self.grad_checkpointing = grad_checkpointing

        if mrar:
            self.num_stages = patch_size ** 2
            self.tokens_per_stage = (latent_size // patch_size) ** 2
            self.seq_len = self.num_stages * self.tokens_per_stage  # = latent_size²
            self.decoder_patch_size = 1
        else:
            self.num_stages = 1
            self.seq_len = min((latent_size // patch_size) ** 2, MAX_COND_TOKENS)
            self.tokens_per_stage = self.seq_len
            self.decoder_patch_size = patch_size
        self.decoder_grid = latent_size // self.decoder_patch_size
        self.diff_seqlen = self.decoder_grid ** 2
        self.decoder_token_dim = vae_embed_dim * self.decoder_patch_size ** 2

        width = encoder_embed_dim
        self.fake_latent = nn.Parameter(torch.zeros(1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, self.tokens_per_stage if mrar else 1, width))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + self.seq_len, width))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.class_emb = nn.Embedding(class_num, width)
        self.z_proj = nn.Linear(self.token_embed_dim, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=1e-6)
        # Parity: the encoder has 2·encoder_depth blocks (this matches the README's parameter counts).
        self.encoder_blocks = nn.ModuleList([
            EncoderBlock(width, encoder_num_heads, mlp_ratio, norm_layer, attn_dropout, proj_dropout)
            for _ in range(encoder_depth * 2)])
        self.encoder_norm = norm_layer(width)
        self.diffdecoder = DiffusionDecoder(
            in_channels=self.decoder_token_dim, cond_dim=width, width=decoder_embed_dim, seq_len=self.diff_seqlen,
            depth=decoder_depth, num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer,
            attn_drop=attn_dropout, proj_drop=proj_dropout, grad_checkpointing=grad_checkpointing)

        if mrar:
            blocks = [buffer_size] + [self.tokens_per_stage] * self.num_stages
            self.register_buffer("attention_mask", block_causal_mask(blocks), persistent=False)
        else:
            self.attention_mask = None
            # Parity: the original computes z_proj and then overwrites its output, so it never learns; we keep
            # the parameter for checkpoint compatibility but freeze it and skip the computation.
            self.z_proj.requires_grad_(False)
        self.initialize_weights()

    # ------------------------------------------------------------------ init and geometry
    def initialize_weights(self):
        for param in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                      self.diffusion_pos_embed_learned):
            nn.init.normal_(param, std=0.02)
        self.apply(_init_linear_and_norm)
        self.diffdecoder.net.initialize_weights()

    def patchify(self, x: torch.Tensor, patch_size: Optional[int] = None) -> torch.Tensor:
        """Latents [B, C, H, W] (H = W = `latent_size`) -> tokens [B, h·w, C·p²] with h = H/p, w = W/p.

        Feature index c·p² + i·p + j (channel outermost). p defaults to the encoder's `patch_size`.
        """
        p = patch_size or self.patch_size
        batch, channels = x.shape[0], self.vae_embed_dim
        if x.shape[1:] != (channels, self.latent_size, self.latent_size):
            raise ValueError(f"expected latents [B, {channels}, {self.latent_size}, {self.latent_size}], "
                             f"got {list(x.shape)}")
        grid = self.latent_size // p
        x = x.reshape(batch, channels, grid, p, grid, p)  # [B, C, h, p, w, p]
        x = torch.einsum("nchpwq->nhwcpq", x)  # [B, h, w, C, p, p]
        return x.reshape(batch, grid * grid, channels * p * p)  # [B, h·w, C·p²]

    def unpatchify(self, x: torch.Tensor, patch_size: Optional[int] = None) -> torch.Tensor:
        """Tokens [B, h·w, C·p²] -> latents [B, C, H, W], the inverse of `patchify` (h = w = `latent_size`/p)."""
        p = patch_size or self.patch_size
        grid = self.latent_size // p
        batch, length, _ = x.shape
        if length != grid * grid:
            raise ValueError(f"{length} tokens do not form the {grid}x{grid} grid of patch size {p}")
        channels = self.vae_embed_dim
        x = x.reshape(batch, grid, grid, channels, p, p)  # [B, h, w, C, p, p]
        x = torch.einsum("nhwcpq->nchpwq", x)  # [B, C, h, p, w, p]
        return x.reshape(batch, channels, grid * p, grid * p)  # [B, C, H, W]

    # ------------------------------------------------------------------ encoder
    def forward_encoder(self, tokens: Optional[torch.Tensor], class_embedding: torch.Tensor) -> torch.Tensor:
        """Condition tokens z [B, L, D] (position embedding included).

        class_embedding [B, D]: a class or `fake_latent` row per sample (label drop happens in `forward`).
        tokens: MRAR only, [B, L, C·p²] patchified references, L a multiple of `tokens_per_stage`; the first
        stage's slots are ignored (they hold the mask tokens). The 1-step encoder takes no tokens.
        Parity: the original MRAR `forward_encoder` returned z before the position embedding (its callers
        added it); here both modes include it.
        """
        batch = class_embedding.shape[0]
        if self.mrar:
            length = tokens.shape[1]
            if length % self.tokens_per_stage or length > self.seq_len:
                raise ValueError(f"MRAR tokens must be 1..{self.num_stages} stages of {self.tokens_per_stage}, "
                                 f"got {length}")
            references = self.z_proj(tokens[:, self.tokens_per_stage:])  # [B, L - Ls, D]
            image_slots = torch.cat([self.mask_token.expand(batch, -1, -1).to(references.dtype), references],
                                    dim=1)  # [B, L, D]
        else:
            length = self.seq_len
            image_slots = self.mask_token.expand(batch, length, -1)  # [B, L, D]
        prefix = class_embedding[:, None].expand(-1, self.buffer_size, -1).to(image_slots.dtype)  # [B, buf, D]
        x = torch.cat([prefix, image_slots], dim=1)  # [B, buf + L, D]
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, :x.shape[1]])  # [B, buf + L, D]
        mask = self.attention_mask
        if mask is not None:
            mask = mask[:, :, :x.shape[1], :x.shape[1]]  # [1, 1, buf + L, buf + L]
        for index, block in enumerate(self.encoder_blocks):
            if checkpointed(self.grad_checkpointing, index) and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self.encoder_norm(x)[:, self.buffer_size:]  # [B, L, D]
        return x + self.diffusion_pos_embed_learned[:, :length]  # [B, L, D]

    # ------------------------------------------------------------------ training
    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, noise: Optional[torch.Tensor] = None,
                     timesteps: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> FlowLossOutput:
        """Flow-matching loss with `diffusion_batch_mul` draws per sample; row k·B + b is copy k of sample b.

        The condition projection and every block's cross-attention keys/values are computed once per sample
        and repeated to its copies (the original repeats z and projects every copy): the same values, and the
        backward sums the copies' gradients before the projections.
        """
        mul = self.diffusion_batch_mul
        net = self.diffdecoder.net
        target = target.repeat(mul, 1, 1)  # [B·mul, N, C]
        prepared = net.prepare_condition(z).repeat(mul)  # keys/values [B·mul, H, L, D/H]
        return flow_matching_loss(lambda x_t, k: net.forward_prepared(x_t, prepared, k),
                                  target, noise=noise, timesteps=timesteps, generator=generator)

    def forward(self, images, labels: torch.Tensor, *, drop_rand: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, timesteps: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, return_details: bool = False):
        """Training loss (a scalar; `return_details=True` gives a `TrainingOutput`).

        images: 1-step: latents [B, C, h, w]; MRAR: `num_stages` latents of that shape (a sequence, or a
            tensor [B, S, C, h, w]), all of the sample's class; images 0..S-2 are also the references.
        labels: [B] int64.
        drop_rand [B], noise and timesteps fix the random draws (otherwise drawn from `generator`, in the
        original's order: label drop, then per stage noise then times). noise is [B·mul, N, C] (1-step) or
        [S, B·mul, N, C] (MRAR); timesteps [B·mul] or [S, B·mul] int64 in 0..999.
        """
        device = labels.device
        batch = labels.shape[0]
        class_embedding = self.class_emb(labels)  # [B, D]
        if self.training:
            if drop_rand is None:
                drop_rand = torch.rand(batch, device=device, generator=generator)  # [B]
            drop = drop_rand.to(device) < self.label_drop_prob
            class_embedding = drop_labels(class_embedding, self.fake_latent, drop)  # [B, D]

        if self.mrar:
            stage_images = list(images.unbind(1)) if torch.is_tensor(images) else list(images)  # S x [B, C, h, w]
            if len(stage_images) != self.num_stages:
                raise ValueError(f"MRAR training needs {self.num_stages} images per sample, got {len(stage_images)}")
            targets = [self.patchify(img, patch_size=1) for img in stage_images]  # S x [B, N, C]
            references = [self.patchify(img) for img in stage_images[:-1]]  # (S-1) x [B, Ls, C·p²]
            first_stage = references[0].new_zeros(batch, self.tokens_per_stage, self.token_embed_dim)  # [B, Ls, C·p²]
            z = self.forward_encoder(torch.cat([first_stage, *references], dim=1), class_embedding)  # [B, L, D]
            conditions = [z[:, :self.tokens_per_stage * (k + 1)] for k in range(self.num_stages)]  # k: [B, Ls·(k+1), D]
        else:
            targets = [self.patchify(images)]  # 1 x [B, N, C]
            z = self.forward_encoder(None, class_embedding)  # [B, L, D]
            conditions = [z]
            noise = None if noise is None else noise[None]  # [1, B·mul, N, C]
            timesteps = None if timesteps is None else timesteps[None]  # [1, B·mul]

        outputs = [self.forward_loss(cond, target,
                                     noise=None if noise is None else noise[k],  # [B·mul, N, C]
                                     timesteps=None if timesteps is None else timesteps[k],  # [B·mul]
                                     generator=generator)
                   for k, (cond, target) in enumerate(zip(conditions, targets))]
        stage_losses = torch.stack([out.loss.mean() for out in outputs])  # [S]
        loss = stage_losses.mean()  # []
        if not return_details:
            return loss
        return TrainingOutput(loss, stage_losses, z, torch.stack([o.timesteps for o in outputs]),  # [S, B·mul]
                              torch.stack([o.x_t for o in outputs]),  # [S, B·mul, N, C]
                              torch.stack([o.prediction for o in outputs]))  # [S, B·mul, N, C]

    # ------------------------------------------------------------------ sampling
    def unconditional_embedding(self, batch: int) -> torch.Tensor:
        return self.fake_latent.expand(batch, -1)  # [B, D]

    def label_condition(self, labels: torch.Tensor, guided: bool) -> PreparedCondition:
        """Prepared condition of a stage that depends on the label alone (1-step, or the first MRAR stage).

        Rows are `[cond; uncond]` ([2B]) when guided, else [B], as `velocity_function` expects. The encoder
        and the key/value projections run once per distinct label and once for the unconditional row; the
        rows are then gathered to the images (each row depends on its own input only, so the values are those
        of one pass per image).
        """
        distinct, inverse = labels.unique(return_inverse=True)  # [U], [B]
        embedding = self.class_emb(distinct)  # [U, D]
        rows = inverse  # [B]
        if guided:
            embedding = torch.cat([embedding, self.unconditional_embedding(1)])  # [U + 1, D]
            rows = torch.cat([inverse, inverse.new_full(inverse.shape, len(distinct))])  # [2B]
        tokens = (embedding.new_zeros(len(embedding), self.tokens_per_stage, self.token_embed_dim)  # [U', Ls, C·p²]
                  if self.mrar else None)
        cond = self.forward_encoder(tokens, embedding)  # [U', Ls, D]
        return self.diffdecoder.net.prepare_condition(cond).rows(rows)  # keys/values [B', H, Ls, D/H]

    def velocity_function(self, cond: Union[torch.Tensor, PreparedCondition], cfg: float,
                          cfg_interval: Optional[Tuple[float, float]] = None) -> VelocityFn:
        """Guided velocity `(x [B, N, C], t) -> v`; cond has 2B rows ([cond; uncond]) when cfg != 1.

        cond: condition tokens [B', L, D], or their `PreparedCondition`. The cross-attention keys/values are
        computed once here, not once per step.
        cfg_interval: (lo, hi) in [0, 1]: guidance only while lo <= t <= hi (t = 1 is noise); at other times
            the conditional velocity alone, on the B conditional rows (half the network batch). None: guidance
            at every step.
        Guidance is applied to the velocity: the original mixes the SDE drifts instead, which is the same
        thing, since the drift is affine in v with the same x in both halves.
        """
        net = self.diffdecoder.net
        prepared = net.prepare_condition(cond) if torch.is_tensor(cond) else cond
        guided = cfg != 1.0
        if cfg_interval is not None:
            lo, hi = cfg_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {tuple(cfg_interval)}")
        conditional = prepared.rows(slice(0, prepared.batch // 2)) if guided else prepared  # kv [B, H, L, D/H]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """t: a 0-dim float32 tensor on the host (`models.samplers`)."""
            guide = guided and (cfg_interval is None or lo <= float(t) <= hi)
            x_in = torch.cat([x, x]) if guide else x  # [B', N, C]
            net_t = torch.full((x_in.shape[0],), float(t * TIME_SCALE), device=x.device)  # [B'] float32
            v = net.forward_prepared(x_in, prepared if guide else conditional, net_t).to(x.dtype)  # [B', N, C]
            if not guide:
                return v
            v_cond, v_uncond = v.chunk(2)  # 2 x [B, N, C]
            return v_uncond + cfg * (v_cond - v_uncond)  # [B, N, C]

        return velocity

    def stage_cfgs(self, cfg: Union[float, Sequence[float]]) -> List[float]:
        """A cfg per stage: a number applies to every stage, a list must have one value per stage."""
        if isinstance(cfg, (int, float)):
            return [float(cfg)] * self.num_stages
        cfgs = [float(c) for c in cfg]
        if len(cfgs) != self.num_stages:
            raise ValueError(f"cfg list has {len(cfgs)} values, the model has {self.num_stages} stage(s)")
        return cfgs

    @torch.no_grad()
    def samples(self, labels: torch.Tensor, num_sampling_steps: Optional[int] = None,
                cfg: Union[float, Sequence[float]] = 1.0, sampler: str = "maruyama", scale_0: float = 1.0,
                scale_1: float = 1.0, *, cfg_interval: Optional[Tuple[float, float]] = None,
                noise: Optional[torch.Tensor] = None, generator=None, return_stages: bool = False,
                velocity_hook: Optional[Callable[[VelocityFn], VelocityFn]] = None):
        """Generate latents [B, C, h, w] (still × latent_scale) for `labels` [B].

        num_sampling_steps: network evaluations per stage (None: the constructor's value, 100 by default).
        cfg: guidance scale, or one per MRAR stage. scale_0 / scale_1: drift / noise scales of the maruyama
            sampler.
        cfg_interval: (lo, hi) in [0, 1]: guidance only at times lo <= t <= hi (t = 1 is noise), the
            conditional velocity alone elsewhere (half the network batch); None: guidance at every step.
        noise: initial noise in token layout [B, N, C] (MRAR: reused by every stage).
        generator: None, a torch.Generator, a list of per-image generators, or a `models.noise` source.
        return_stages: MRAR: return the list of every stage's output instead of the last.
        velocity_hook: wraps each stage's velocity function (progress bars, tracing).
        """
        source = as_noise_source(generator)
        steps = num_sampling_steps or self.num_sampling_steps
        cfgs = self.stage_cfgs(cfg)
        batch = labels.shape[0]
        device = labels.device
        class_embedding = self.class_emb(labels)  # [B, D]
        if noise is None:
            noise = source.randn((batch, self.diff_seqlen, self.decoder_token_dim), device=device,
                                 dtype=class_embedding.dtype)  # [B, N, C]
        tokens = (class_embedding.new_zeros(batch, self.seq_len, self.token_embed_dim)  # [B, L, C·p²]
                  if self.mrar else None)
        stage_outputs = []
        for stage, stage_cfg in enumerate(cfgs):
            guided = stage_cfg != 1.0
            if stage == 0:
                cond = self.label_condition(labels, guided)  # the same for every image of a class
            else:
                start = self.tokens_per_stage * stage
                tokens[:, start:start + self.tokens_per_stage] = self.patchify(stage_outputs[-1])  # [B, Ls, C·p²]
                stage_tokens = tokens[:, :start + self.tokens_per_stage]  # [B, Ls·(stage+1), C·p²]
                embedding = class_embedding
                if guided:
                    embedding = torch.cat([class_embedding, self.unconditional_embedding(batch)])  # [2B, D]
                    stage_tokens = torch.cat([stage_tokens, stage_tokens])  # [2B, Ls·(stage+1), C·p²]
                cond = self.forward_encoder(stage_tokens, embedding)  # [B', Ls·(stage+1), D], B' = B or 2B
            velocity = self.velocity_function(cond, stage_cfg, cfg_interval)
            if velocity_hook is not None:
                velocity = velocity_hook(velocity)
            x = run_sampler(sampler, velocity, noise, steps, source, scale_0=scale_0, scale_1=scale_1)  # [B, N, C]
            stage_outputs.append(self.unpatchify(x.float(), patch_size=self.decoder_patch_size))  # [B, C, h, w]
        return stage_outputs if return_stages else stage_outputs[-1]


def _init_linear_and_norm(module: nn.Module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _factory(name: str, width: int, depth: int, heads: int, note: str) -> Callable[..., TransDiff]:
    def build(**kwargs) -> TransDiff:
        sizes = dict(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=width,
                     decoder_depth=depth, decoder_num_heads=heads, mlp_ratio=4,
                     norm_layer=partial(nn.LayerNorm, eps=1e-6))
        return TransDiff(**{**sizes, **kwargs})
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"TransDiff with width {width}, {2 * depth} encoder blocks, {depth} decoder blocks, {heads} "
                     f"heads ({note}); keyword arguments go to `TransDiff` and may override the sizes.")
    return build


transdiff_tiny = _factory("transdiff_tiny", 64, 1, 4, "0.34M params: CPU tests and the digits quickstart")
transdiff_base = _factory("transdiff_base", 768, 12, 12, "290M params")
transdiff_large = _factory("transdiff_large", 1024, 16, 16, "683M params")
transdiff_huge = _factory("transdiff_huge", 1280, 20, 16, "1.3B params")

TRANSDIFF_MODELS: Dict[str, Callable[..., TransDiff]] = {
    "transdiff_tiny": transdiff_tiny,
    "transdiff_base": transdiff_base,
    "transdiff_large": transdiff_large,
    "transdiff_huge": transdiff_huge,
}
