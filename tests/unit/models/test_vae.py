"""KL-16 VAE: full-size layout against the original, checkpoint loading, small-width shapes, posterior."""
import json

import pytest
import torch

from models.vae import AutoencoderKL, DiagonalGaussianDistribution, load_kl16

SMALL_CH = 32  # the width of conftest's ch32_state_dict; GroupNorm(32) needs a multiple of 32


@pytest.fixture(scope="module")
def ch32_model(ch32_state_dict):
    model = AutoencoderKL(ch=SMALL_CH).eval()
    model.load_state_dict(ch32_state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def meta_kl16():
    with torch.device("meta"):
        return AutoencoderKL()


@pytest.fixture
def ch32_checkpoint(tmp_path, ch32_state_dict):
    path = tmp_path / "vae_ch32.ckpt"
    torch.save({"model": ch32_state_dict}, path)
    return path


def test_full_size_layout_matches_kl16_checkpoint(golden_dir, meta_kl16):
    reference = json.loads((golden_dir / "vae_kl16_keys.json").read_text())
    layout = {key: list(tensor.shape) for key, tensor in meta_kl16.state_dict().items()}
    assert list(layout) == list(reference["state_dict"])
    assert layout == reference["state_dict"]
    assert len(layout) == reference["num_state_dict_tensors"] == 312
    assert sum(p.numel() for p in meta_kl16.parameters()) == reference["num_params"] == 66_456_019


def test_full_size_output_shapes_match_randinit_vectors(golden_dir, meta_kl16):
    case = torch.load(golden_dir / "vae_kl16_randinit_outputs.pt", weights_only=True)["randinit_no_weights"]
    inputs, ref = case["inputs"], case["outputs"]
    posterior = meta_kl16.encode(inputs["x"].to("meta"))
    shapes = {
        "mean": posterior.mean.shape,
        "logvar": posterior.logvar.shape,
        "std": posterior.std.shape,
        "moments": posterior.parameters.shape,
        "decoded_z": meta_kl16.decode(inputs["z"].to("meta")).shape,
        "decoded_mean": meta_kl16.decode(posterior.mean).shape,
    }
    assert shapes == {name: tensor.shape for name, tensor in ref.items()}


@pytest.mark.parametrize("size", [(256, 256), (512, 512), (256, 512)])
def test_full_size_stride_is_16(meta_kl16, size):
    h, w = size
    posterior = meta_kl16.encode(torch.empty(2, 3, h, w, device="meta"))
    assert meta_kl16.stride == 16 and meta_kl16.embed_dim == 16
    assert posterior.mean.shape == (2, 16, h // 16, w // 16)
    assert posterior.parameters.shape == (2, 32, h // 16, w // 16)
    assert meta_kl16.decode(posterior.sample()).shape == (2, 3, h, w)


@pytest.mark.parametrize("latent_side", [16, 32])
def test_small_width_decode_shape(ch32_model, latent_side):
    # 16x16 and 32x32 latents are what 256 px and 512 px images give.
    z = torch.randn(1, 16, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = ch32_model.decode(z)
    assert image.shape == (1, 3, 16 * latent_side, 16 * latent_side)
    assert torch.isfinite(image).all()


def test_from_checkpoint_loads_wrapped_state_dict_frozen(ch32_checkpoint, ch32_state_dict):
    model = AutoencoderKL.from_checkpoint(ch32_checkpoint, ch=SMALL_CH)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert all(tensor.dtype == torch.float32 for tensor in loaded.values())
    for key, tensor in ch32_state_dict.items():
        assert torch.equal(loaded[key], tensor.float()), key


def test_from_checkpoint_loads_bare_state_dict(tmp_path, ch32_state_dict):
    path = tmp_path / "bare.pt"
    torch.save(ch32_state_dict, path)
    model = AutoencoderKL.from_checkpoint(path, ch=SMALL_CH)
    key = "decoder.conv_out.weight"
    assert torch.equal(model.state_dict()[key], ch32_state_dict[key].float())


def test_missing_file_error_says_where_to_get_it(tmp_path):
    missing = tmp_path / "nowhere" / "kl16.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere.*kl16.ckpt") as info:
        load_kl16(missing)
    assert "dropbox.com" in str(info.value)
    assert "--tokenizer pixel" in str(info.value)


def test_non_checkpoint_file_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt' is not a readable torch checkpoint"):
        load_kl16(path)


class Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_a_pickled_object_is_refused_without_torchs_advice(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(ValueError, match="evil.ckpt' is not a readable torch checkpoint: .*never unpickled$") as info:
        load_kl16(path)
    assert "weights_only" not in str(info.value)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, ch32_state_dict):
    path = tmp_path / "nan.ckpt"
    torch.save({"model": {**ch32_state_dict, "decoder.conv_out.bias": torch.full((3,), float("nan"))}}, path)
    with pytest.raises(ValueError, match="nan.ckpt': tensor decoder.conv_out.bias holds non-finite values"):
        AutoencoderKL.from_checkpoint(path, ch=SMALL_CH)


def test_non_state_dict_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "list.pt"
    torch.save({"model": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match="list.pt' does not hold a VAE state_dict"):
        load_kl16(path)


def test_wrong_width_checkpoint_lists_shape_mismatches(ch32_checkpoint):
    with pytest.raises(ValueError, match=r"wrongly shaped key\(s\), e.g. encoder.conv_in.weight \(32, 3, 3, 3\)"):
        load_kl16(ch32_checkpoint)


def test_missing_and_unexpected_keys_are_listed(tmp_path, ch32_state_dict):
    state_dict = dict(ch32_state_dict)
    state_dict["extra.weight"] = state_dict.pop("quant_conv.bias")
    path = tmp_path / "renamed.ckpt"
    torch.save({"model": state_dict}, path)
    with pytest.raises(ValueError, match="renamed.ckpt") as info:
        AutoencoderKL.from_checkpoint(path, ch=SMALL_CH)
    message = str(info.value)
    assert "1 missing key(s), e.g. quant_conv.bias" in message
    assert "1 unexpected key(s), e.g. extra.weight" in message


def _moments(logvar_value):
    mean = torch.arange(8.0).reshape(1, 2, 2, 2)
    return torch.cat([mean, torch.full_like(mean, logvar_value)], dim=1)  # [1, 4, 2, 2]


def test_posterior_clamps_logvar():
    assert torch.equal(DiagonalGaussianDistribution(_moments(100.0)).logvar, torch.full((1, 2, 2, 2), 20.0))
    low = DiagonalGaussianDistribution(_moments(-100.0))
    assert torch.equal(low.logvar, torch.full((1, 2, 2, 2), -30.0))
    torch.testing.assert_close(low.std, torch.exp(torch.tensor(-15.0)).expand(1, 2, 2, 2))


def test_posterior_statistics():
    moments = _moments(2.0)
    posterior = DiagonalGaussianDistribution(moments)
    assert posterior.parameters is moments
    assert torch.equal(posterior.mean, moments[:, :2])
    torch.testing.assert_close(posterior.std, torch.full((1, 2, 2, 2), torch.e))


def test_sample_with_seeded_generator_is_deterministic():
    posterior = DiagonalGaussianDistribution(_moments(0.0))
    first = posterior.sample(torch.Generator().manual_seed(3))
    again = posterior.sample(torch.Generator().manual_seed(3))
    other = posterior.sample(torch.Generator().manual_seed(4))
    expected_noise = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.testing.assert_close(first, posterior.mean + expected_noise)


def test_deterministic_posterior_is_a_point_mass():
    posterior = DiagonalGaussianDistribution(_moments(0.0), deterministic=True)
    assert torch.equal(posterior.std, torch.zeros(1, 2, 2, 2))
    assert torch.equal(posterior.sample(torch.Generator().manual_seed(0)), posterior.mean)


def test_small_kl_vae_reproduces_the_originals_numbers(golden_dir):
    """The KL-16 architecture at a small width, with perturbed float16-representable weights, against the original
    code's outputs (tests/golden/README.md): encode's moments and both decodes, at the parity tolerance."""
    case = torch.load(golden_dir / "vae_small_cases.pt", weights_only=True)["encode_decode"]
    config = case["config"]
    vae = AutoencoderKL(embed_dim=config["embed_dim"], ch_mult=tuple(config["ch_mult"]), ch=config["ch"])
    vae.load_state_dict({key: value.float() for key, value in
                         torch.load(golden_dir / "vae_small_model.pt", weights_only=True).items()})
    vae.eval()
    inputs, expected = case["inputs"], case["outputs"]
    with torch.no_grad():
        posterior = vae.encode(inputs["x"])
        got = {"mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std,
               "moments": posterior.parameters, "decoded_z": vae.decode(inputs["z"]),
               "decoded_mean": vae.decode(posterior.mean)}
    assert set(got) == set(expected)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=name)
