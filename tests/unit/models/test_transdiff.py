"""Behaviour of the model across the registry, at tiny widths, on CPU."""
import json

import pytest
import torch
from torch.testing import assert_close

from models.noise import PerImageNoise
from models.transdiff import TRANSDIFF_MODELS, TransDiff, transdiff_tiny

TINY = dict(img_size=32, vae_stride=2, vae_embed_dim=4, class_num=5, buffer_size=4, attn_dropout=0.0,
            proj_dropout=0.0, diffusion_batch_mul=2)


def build(mrar=False, **overrides):
    kwargs = {**TINY, "patch_size": 2 if mrar else 1, "mrar": mrar, **overrides}
    torch.manual_seed(0)
    return unzero_output_layer(transdiff_tiny(**kwargs))


def unzero_output_layer(model):
    """The output Linear starts at zero, which blocks every other gradient (and makes v = 0) at step 0."""
    torch.nn.init.normal_(model.diffdecoder.net.final_layer.linear.weight, std=0.02)
    return model


def latents(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model.vae_embed_dim, model.latent_size, model.latent_size)
    if model.mrar:
        return [torch.randn(shape, generator=g) for _ in range(model.num_stages)]
    return torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("mrar,img_size,stride", [(False, 32, 2), (False, 256, 16), (False, 512, 16), (False, 64, 4),
                                                   (False, 16, 2), (False, 32, 1),
                                                   (True, 32, 2), (True, 256, 16), (True, 64, 4)])
def test_geometry_is_derived(mrar, img_size, stride):
    model = TransDiff(img_size=img_size, vae_stride=stride, patch_size=2 if mrar else 1, mrar=mrar,
                      encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                      decoder_depth=1, decoder_num_heads=2, buffer_size=8, class_num=3, vae_embed_dim=4)
    latent = img_size // stride
    assert model.diff_seqlen == latent ** 2
    if mrar:
        assert (model.num_stages, model.tokens_per_stage, model.seq_len) == (4, (latent // 2) ** 2, latent ** 2)
        assert model.mask_token.shape == (1, model.tokens_per_stage, 32)
    else:
        assert model.seq_len == min(latent ** 2, 256)
    assert model.encoder_pos_embed_learned.shape[1] == 8 + model.seq_len


@pytest.mark.parametrize("kwargs,message", [
    (dict(mrar=True, patch_size=1), "MRAR needs --patch_size 2"),
    (dict(img_size=31), "not divisible by the tokenizer stride"),
    (dict(img_size=36, patch_size=4), "not divisible by patch_size"),
    (dict(diffloss_w=128), "must equal the decoder width"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def test_patchify_layout_and_round_trip():
    model = build(mrar=True)
    x = torch.randn(2, 4, 16, 16)
    tokens = model.patchify(x)  # p = 2
    assert tokens.shape == (2, 64, 16)
    # token h·8+w, feature c·4 + 2i + j holds x[:, c, 2h+i, 2w+j]
    assert tokens[1, 3 * 8 + 5, 2 * 4 + 1 * 2 + 0] == x[1, 2, 7, 10]
    assert torch.equal(model.unpatchify(tokens), x)
    assert torch.equal(model.unpatchify(model.patchify(x, patch_size=1), patch_size=1), x)


# ------------------------------------------------------------------------------------- full-size checkpoints
FULL_SIZE = {
    "transdiff_base": ("transdiff_base", {}), "transdiff_large": ("transdiff_large", {}),
    "transdiff_huge": ("transdiff_huge", {}), "transdiff_large_512": ("transdiff_large", {"img_size": 512}),
    "transdiff_base_mrar": ("transdiff_base", {"mrar": True, "patch_size": 2}),
    "transdiff_large_mrar": ("transdiff_large", {"mrar": True, "patch_size": 2}),
    "transdiff_huge_mrar": ("transdiff_huge", {"mrar": True, "patch_size": 2}),
}


@pytest.fixture(scope="module")
def full_size_keys(golden_dir):
    return json.loads((golden_dir / "full_size_state_dict_keys.json").read_text())["models"]


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_state_dict_matches_original(name, full_size_keys):
    factory, kwargs = FULL_SIZE[name]
    reference = full_size_keys[name]
    with torch.device("meta"):
        model = TRANSDIFF_MODELS[factory](vae_embed_dim=16, class_num=1000, buffer_size=64, **kwargs)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(reference["state_dict"])  # same keys, same order
    assert shapes == reference["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


# ------------------------------------------------------------------------------------- training behaviour
@pytest.mark.parametrize("mrar", [False, True])
@pytest.mark.parametrize("name", sorted(TRANSDIFF_MODELS))
def test_forward_backward_every_trainable_parameter_gets_a_finite_gradient(name, mrar):
    # Each registry entry at a CPU-friendly width (heads kept, 4 channels per head, depth 1); full widths
    # are checked on the meta device above.
    model = unzero_output_layer(TRANSDIFF_MODELS[name](**{**TINY, "patch_size": 2 if mrar else 1, "mrar": mrar},
                                                       **_tiny_sizes(name)))
    model.train()
    loss = model(latents(model), torch.tensor([0, 3]), drop_rand=torch.tensor([0.0, 0.9]))  # row 0 unconditional
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
            assert param.grad.abs().sum() > 0, pname
        else:
            assert param.grad is None


def _tiny_sizes(name):
    if name == "transdiff_tiny":
        return {}
    with torch.device("meta"):
        heads = TRANSDIFF_MODELS[name]().encoder_blocks[0].attn.num_heads
    return dict(encoder_embed_dim=4 * heads, decoder_embed_dim=4 * heads, encoder_depth=1, decoder_depth=1)


def test_one_step_z_proj_is_frozen_and_mrar_z_proj_trains():
    assert not any(p.requires_grad for p in build(mrar=False).z_proj.parameters())
    assert all(p.requires_grad for p in build(mrar=True).z_proj.parameters())


@pytest.mark.parametrize("mrar,setting", [(False, True), (True, True), (False, 1), (True, 1)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(mrar, setting):
    plain, ckpt = build(mrar), build(mrar, grad_checkpointing=setting)
    ckpt.load_state_dict(plain.state_dict())
    draws = dict(generator=None)
    results = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(5)
        loss = model(latents(model), torch.tensor([1, 2]), **draws)
        loss.backward()
        results.append((loss.detach(), model.diffdecoder.net.input_proj.weight.grad.clone()))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("setting,encoder,decoder", [(False, 0, 0), (True, 2, 1), (1, 1, 1), (2, 2, 1), (0, 0, 0)])
def test_selective_checkpointing_recomputes_the_first_n_blocks_of_each_stack(monkeypatch, setting, encoder, decoder):
    """`--grad_checkpointing N`: the first N of the encoder's 2 blocks and of the decoder's 1 (the tiny model's
    stacks), every block for True; never outside autograd."""
    import models.diffdecoder
    import models.transdiff

    calls = {"encoder": 0, "decoder": 0}

    def counting(stack, wrapped):
        def checkpoint(*args, **kwargs):
            calls[stack] += 1
            return wrapped(*args, **kwargs)
        return checkpoint

    monkeypatch.setattr(models.transdiff, "checkpoint", counting("encoder", models.transdiff.checkpoint))
    monkeypatch.setattr(models.diffdecoder, "checkpoint", counting("decoder", models.diffdecoder.checkpoint))
    model = build(grad_checkpointing=setting).train()
    assert (len(model.encoder_blocks), len(model.diffdecoder.net.res_blocks)) == (2, 1)
    model(latents(model), torch.tensor([1, 2])).backward()
    assert calls == {"encoder": encoder, "decoder": decoder}
    with torch.no_grad():
        model(latents(model), torch.tensor([1, 2]))
    assert calls == {"encoder": encoder, "decoder": decoder}


def test_label_drop_uses_fake_latent():
    model = build()
    model.train()
    forced = dict(noise=torch.zeros(4, 256, 4), timesteps=torch.full((4,), 500))
    def run(labels, drop_rand):
        return model(latents(model), torch.tensor(labels), drop_rand=torch.tensor(drop_rand), return_details=True,
                     **forced)
    dropped, other_labels, kept = run([0, 1], [0.0, 0.0]), run([3, 4], [0.0, 0.0]), run([0, 1], [0.99, 0.99])
    assert torch.equal(dropped.z, other_labels.z)  # both rows unconditional
    assert not torch.allclose(dropped.z, kept.z)


def test_seeded_training_draws_are_reproducible():
    model = build(mrar=True)
    model.train()
    losses = [model(latents(model), torch.tensor([0, 1]), generator=torch.Generator().manual_seed(3))
              for _ in range(2)]
    assert torch.equal(losses[0], losses[1])


# ------------------------------------------------------------------------------------- sampling behaviour
@pytest.mark.parametrize("sampler,steps", [("maruyama", 4), ("euler", 3), ("heun", 2)])
@pytest.mark.parametrize("mrar", [False, True])
def test_samplers_are_deterministic_given_a_generator(sampler, steps, mrar):
    model = build(mrar).eval()
    labels = torch.tensor([0, 4])
    runs = [model.samples(labels, steps, cfg=2.0, sampler=sampler, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0].shape == (2, 4, 16, 16)
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])


def test_per_image_noise_does_not_depend_on_the_batch():
    model = build().eval()
    labels = torch.tensor([0, 1, 2])
    together = model.samples(labels, 3, cfg=1.5, scale_1=1.0, generator=PerImageNoise.from_seeds([10, 11, 12]))
    alone = model.samples(labels[1:2], 3, cfg=1.5, scale_1=1.0, generator=PerImageNoise.from_seeds([11]))
    assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


def test_cached_condition_equals_uncached_velocity():
    model = build().eval()
    net = model.diffdecoder.net
    x, cond, t = torch.randn(3, 256, 4), torch.randn(3, 256, 64), torch.tensor([10.0, 500.0, 999.0])
    with torch.no_grad():
        assert torch.equal(net.forward_prepared(x, net.prepare_condition(cond), t), net(x, cond, t))


def test_velocity_function_prepares_the_condition_once(monkeypatch):
    model = build().eval()
    calls = []
    original = model.diffdecoder.net.cond_embed.forward
    monkeypatch.setattr(model.diffdecoder.net.cond_embed, "forward", lambda c: calls.append(1) or original(c))
    model.samples(torch.tensor([1]), 6, cfg=2.0)
    assert len(calls) == 1


def test_ode_samplers_refuse_sde_scales():
    model = build().eval()
    with pytest.raises(ValueError, match="only apply to the maruyama sampler"):
        model.samples(torch.tensor([0]), 2, sampler="euler", scale_0=0.9)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.samples(torch.tensor([0]), 2, sampler="ddim")


def test_mrar_cfg_list_must_have_one_value_per_stage():
    model = build(mrar=True).eval()
    with pytest.raises(ValueError, match="4 stage"):
        model.samples(torch.tensor([0]), 2, cfg=[1.0, 2.0])
    stages = model.samples(torch.tensor([0]), 2, cfg=[1, 1.2, 1.3, 1.5], return_stages=True)
    assert len(stages) == 4 and all(s.shape == (1, 4, 16, 16) for s in stages)


def test_samples_default_to_the_constructor_step_count():
    model = build(num_sampling_steps="3").eval()
    calls = []
    model.samples(torch.tensor([0]), velocity_hook=lambda v: (lambda x, t: calls.append(t) or v(x, t)))
    assert len(calls) == 3


# ------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("mrar", [False, True])
def test_bf16_autocast_runs(mrar):
    model = build(mrar)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(latents(model), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.samples(torch.tensor([0]), 2, cfg=1.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bf16_cast_model_keeps_float32_time_frequencies():
    model = build().eval().to(torch.bfloat16)
    embedder = model.diffdecoder.net.time_embed.time_embedder
    assert embedder.time_features(torch.tensor([999.0])).dtype == torch.float32
    out = model.diffdecoder.net(torch.randn(1, 256, 4, dtype=torch.bfloat16),
                                torch.randn(1, 256, 64, dtype=torch.bfloat16), torch.tensor([500.0]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
