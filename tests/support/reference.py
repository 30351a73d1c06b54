"""The original's straightforward execution of a TransDiff, kept as the reference of the shared-work paths.

`TransDiff` computes the condition's keys/values once per sample and shares them across its diffusion copies
in training, and in sampling runs the encoder once per distinct label and the key/value projections once per
condition (not per step). These functions do the same work the original's way, so that tests can check the
shared paths against them (tests/unit/models/test_shared_work.py) and `benchmarks/compare.py` can time both:

* `per_copy_forward_loss`: training, the condition repeated to the B·mul rows and projected per copy;
* `per_image_samples`: sampling, the encoder once per image and stage, the condition projection and every
  block's keys/values again at every step.
"""
from __future__ import annotations

from typing import List

import torch

from models.flow import TIME_SCALE, FlowLossOutput, flow_matching_loss
from models.noise import as_noise_source
from models.samplers import run_sampler


def per_copy_forward_loss(model, z: torch.Tensor, target: torch.Tensor, noise=None, timesteps=None,
                          generator=None) -> FlowLossOutput:
    """`TransDiff.forward_loss` the original's way: z [B, L, D] repeated to B·mul rows, each copy projected."""
    mul = model.diffusion_batch_mul
    net = model.diffdecoder.net
    prepared = net.prepare_condition(z.repeat(mul, 1, 1))  # keys/values [B·mul, H, L, D/H]
    return flow_matching_loss(lambda x_t, k: net.forward_prepared(x_t, prepared, k), target.repeat(mul, 1, 1),
                              noise=noise, timesteps=timesteps, generator=generator)


def per_step_velocity(model, cond: torch.Tensor, cfg: float):
    """The guided velocity of `cond` [B', L, D] with the condition projected again at every step."""
    net = model.diffdecoder.net

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if cfg != 1.0 else x  # [B', N, C]
        net_t = torch.full((x_in.shape[0],), float(t * TIME_SCALE), device=x.device)  # [B'], t on the host
        v = net(x_in, cond, net_t).to(x.dtype)  # [B', N, C]
        if cfg == 1.0:
            return v
        v_cond, v_uncond = v.chunk(2)  # 2 x [B, N, C]
        return v_uncond + cfg * (v_cond - v_uncond)  # [B, N, C]

    return velocity


@torch.no_grad()
def per_image_samples(model, labels: torch.Tensor, steps: int, cfg: float, sampler: str, noise: torch.Tensor,
                      generator=None, scale_0: float = 1.0, scale_1: float = 1.0) -> List[torch.Tensor]:
    """`TransDiff.samples(..., return_stages=True)` the original's way; every stage's latents [B, C, h, w]."""
    batch = len(labels)
    source = as_noise_source(generator)
    class_embedding = model.class_emb(labels)  # [B, D]
    tokens = class_embedding.new_zeros(batch, model.seq_len, model.token_embed_dim) if model.mrar else None
    outputs = []
    for stage in range(model.num_stages):
        stage_tokens = None
        if model.mrar:
            if stage > 0:
                start = model.tokens_per_stage * stage
                tokens[:, start:start + model.tokens_per_stage] = model.patchify(outputs[-1])  # [B, Ls, C·p²]
            stage_tokens = tokens[:, :model.tokens_per_stage * (stage + 1)]  # [B, Ls·(stage+1), C·p²]
        embedding = class_embedding
        if cfg != 1.0:
            embedding = torch.cat([class_embedding, model.unconditional_embedding(batch)])  # [2B, D]
            stage_tokens = None if stage_tokens is None else torch.cat([stage_tokens, stage_tokens])
        cond = model.forward_encoder(stage_tokens, embedding)  # [B', L, D]
        x = run_sampler(sampler, per_step_velocity(model, cond, cfg), noise, steps, source, scale_0=scale_0,
                        scale_1=scale_1)  # [B, N, C]
        outputs.append(model.unpatchify(x.float(), patch_size=model.decoder_patch_size))  # [B, C, h, w]
    return outputs
