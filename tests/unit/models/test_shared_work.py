"""The shared-work paths give the per-copy / per-image results; the guidance interval, on CPU at tiny widths.

Each reference is the straightforward path of `tests/support/reference.py` (the original's): the condition repeated
to every diffusion copy in training; in sampling the encoder once per image, the key/value projections at every step.
"""
import pytest
import torch
from torch.testing import assert_close

from models.transdiff import transdiff_tiny
from tests.support.reference import per_copy_forward_loss, per_image_samples

TINY = dict(img_size=32, vae_stride=2, vae_embed_dim=4, class_num=5, buffer_size=4, diffusion_batch_mul=3)
LABELS = torch.tensor([2, 0, 2, 2, 1])  # repeated labels: rows are shared


def build(mrar=False, dropout=0.0):
    torch.manual_seed(0)
    model = transdiff_tiny(**TINY, patch_size=2 if mrar else 1, mrar=mrar, attn_dropout=dropout,
                           proj_dropout=dropout)
    # The output Linear starts at zero, which would block every other gradient.
    torch.nn.init.normal_(model.diffdecoder.net.final_layer.linear.weight, std=0.02)
    return model


def latents(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model.vae_embed_dim, model.latent_size, model.latent_size)
    if model.mrar:
        return [torch.randn(shape, generator=g) for _ in range(model.num_stages)]
    return torch.randn(shape, generator=g)


def count_decoder_rows(model):
    """A list that receives the batch size of every velocity-network evaluation."""
    rows = []
    model.diffdecoder.net.input_proj.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    return rows


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mrar", [False, True])
def test_shared_condition_training_equals_per_copy(mrar, monkeypatch):
    shared, per_copy = build(mrar, dropout=0.1), build(mrar, dropout=0.1)
    monkeypatch.setattr(per_copy, "forward_loss", lambda *args, **kwargs: per_copy_forward_loss(per_copy, *args,
                                                                                                    **kwargs))
    results = []
    for model in (shared, per_copy):
        model.train()
        torch.manual_seed(11)  # the same dropout masks in both
        loss = model(latents(model, 4), torch.tensor([0, 3, 3, 1]), drop_rand=torch.tensor([0.0, 0.5, 0.5, 0.9]),
                     generator=torch.Generator().manual_seed(5))
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}))
    (loss_shared, grads_shared), (loss_per_copy, grads_per_copy) = results
    assert torch.equal(loss_shared, loss_per_copy)
    assert grads_shared.keys() == grads_per_copy.keys()
    for name, grad in grads_shared.items():
        # Only the summation order of the copies' gradients differs.
        assert_close(grad, grads_per_copy[name], atol=1e-7, rtol=1e-5, msg=name)


def test_shared_condition_projects_each_sample_once(monkeypatch):
    model = build().train()
    rows = []
    original = model.diffdecoder.net.cond_embed.forward
    monkeypatch.setattr(model.diffdecoder.net.cond_embed, "forward", lambda c: rows.append(len(c)) or original(c))
    model(latents(model, 2), torch.tensor([0, 1]))
    assert rows == [2]  # not 2 · diffusion_batch_mul


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("sampler,cfg", [("maruyama", 1.5), ("euler", 1.5), ("maruyama", 1.0), ("heun", 3.0)])
@pytest.mark.parametrize("mrar", [False, True])
def test_shared_label_condition_sampling_is_bit_identical(sampler, cfg, mrar):
    model = build(mrar).eval()
    noise = torch.randn(len(LABELS), model.diff_seqlen, model.decoder_token_dim,
                        generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = per_image_samples(model, LABELS, 3, cfg, sampler, noise, torch.Generator().manual_seed(4))
    shared = model.samples(LABELS, 3, cfg=cfg, sampler=sampler, noise=noise, generator=torch.Generator().manual_seed(4),
                           return_stages=True)
    assert len(shared) == len(reference)
    for ours, theirs in zip(shared, reference):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mrar", [False, True])
def test_label_condition_runs_the_encoder_once_per_distinct_row(mrar, monkeypatch):
    model = build(mrar).eval()
    rows = []
    original = model.forward_encoder
    monkeypatch.setattr(model, "forward_encoder", lambda tokens, e: rows.append(len(e)) or original(tokens, e))
    model.samples(LABELS, 2, cfg=1.5)
    distinct = len(LABELS.unique())
    # 1-step: the labels and one unconditional row; MRAR: that for the first stage, then per image.
    assert rows == ([distinct + 1] + [2 * len(LABELS)] * (model.num_stages - 1))


# ------------------------------------------------------------------------------------------- guidance interval
@pytest.mark.parametrize("sampler", ["maruyama", "euler", "heun"])
def test_full_cfg_interval_is_bit_identical_to_guidance_everywhere(sampler):
    model = build().eval()
    runs = [model.samples(LABELS, 4, cfg=2.0, sampler=sampler, cfg_interval=interval,
                          generator=torch.Generator().manual_seed(6))
            for interval in (None, (0.0, 1.0))]
    assert torch.equal(runs[0], runs[1])


def test_narrow_cfg_interval_guides_fewer_steps_at_half_the_batch():
    model = build().eval()
    rows = count_decoder_rows(model)
    batch = len(LABELS)
    noise = torch.randn(batch, 256, 4)
    full = model.samples(LABELS, 4, cfg=2.0, sampler="euler", noise=noise)
    assert rows == [2 * batch] * 4
    rows.clear()
    # euler evaluates at t = 1, 0.75, 0.5, 0.25: guided at the first three only
    narrow = model.samples(LABELS, 4, cfg=2.0, sampler="euler", cfg_interval=(0.5, 1.0), noise=noise)
    assert rows == [2 * batch] * 3 + [batch]
    assert not torch.allclose(full, narrow)


def test_cfg_interval_off_guidance_is_the_conditional_velocity():
    model = build().eval()
    noise = torch.randn(len(LABELS), 256, 4)
    outside = model.samples(LABELS, 3, cfg=2.0, sampler="euler", cfg_interval=(0.0, 0.0), noise=noise)
    unguided = model.samples(LABELS, 3, cfg=1.0, sampler="euler", noise=noise)
    assert_close(outside, unguided, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("interval", [(0.6, 0.4), (-0.1, 0.5), (0.5, 1.2)])
def test_bad_cfg_interval_raises(interval):
    model = build().eval()
    with pytest.raises(ValueError, match="cfg_interval"):
        model.samples(LABELS, 2, cfg=1.5, cfg_interval=interval)
