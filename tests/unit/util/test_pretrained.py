"""util.pretrained: a checkpoint built by its own stored settings, its images drawn as `main.py --evaluate` draws
them, a misfit naming the checkpoint's settings, and the released models' settings."""
import re

import numpy as np
import pytest
import torch

from models.tokenizers import build_tokenizer, decode_from_latents
from tests.support.runs import TINY
from util import pretrained
from util.checkpoint import save_checkpoint
from util.eval.images import to_uint8
from util.eval.layout import image_noise
from util.presets import SAMPLING_PRESETS
from util.settings import get_args_parser, resolve_args


def run_settings(*extra):
    return vars(resolve_args(get_args_parser().parse_args([*TINY, "--num_sampling_steps", "3", "--cfg", "1.5",
                                                           "--sampler", "euler", *extra])))


@pytest.fixture
def checkpoint(tmp_path):
    """A main.py-style checkpoint of a tiny pixel-tokenizer model: distinct raw and EMA weights, stored flags."""
    settings = run_settings()
    torch.manual_seed(0)
    model, ema = pretrained.build_model(settings), pretrained.build_model(settings)
    with torch.no_grad():  # no zero-initialised layer left: guidance and the sampler change the images
        for param in [*model.parameters(), *ema.parameters()]:
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
                                "args": settings})
    return path, model, ema, settings


def test_the_model_is_built_from_the_stored_settings_with_the_ema_weights(checkpoint):
    path, model, ema, settings = checkpoint
    pipe = pretrained.load_checkpoint_model(str(path))
    assert pipe.settings == pretrained.default_settings() | settings
    assert pipe.source == f"{path} (model_ema)" and not pipe.model.training
    assert (pipe.model.num_classes, pipe.model.img_size, pipe.model.buffer_size) == (3, 16, 4)
    for key, value in ema.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[key], value), key
    raw = pretrained.load_checkpoint_model(str(path), use_ema=False)
    assert raw.source == f"{path} (model)"
    assert torch.equal(raw.model.class_emb.weight, model.class_emb.weight)


def test_generate_draws_image_b_from_evaluation_image_first_index_plus_b(checkpoint):
    path, _, ema, settings = checkpoint
    pipe = pretrained.load_checkpoint_model(str(path))
    images = pipe.generate([2, 0], seed=5, first_index=10)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    ema.eval()
    with torch.no_grad():  # the stored sampling settings: euler, 3 steps, cfg 1.5
        latents = ema.samples(torch.tensor([2, 0]), 3, cfg=1.5, sampler="euler", generator=image_noise(5, [10, 11]))
        expected = to_uint8(decode_from_latents(build_tokenizer("pixel", vae_stride=2, vae_embed_dim=12), latents))
    assert np.array_equal(images, expected)
    assert not np.array_equal(images, pipe.generate([2, 0], seed=6, first_index=10))
    assert np.array_equal(images, pipe.generate([2, 0], seed=5, first_index=10))


def test_sampling_settings_can_be_overridden_and_unknown_ones_are_refused(checkpoint):
    pipe = pretrained.load_checkpoint_model(str(checkpoint[0]))
    base = pipe.generate([1], seed=0)
    assert not np.array_equal(base, pipe.generate([1], seed=0, cfg=4.0))
    assert not np.array_equal(base, pipe.generate([1], seed=0, sampler="heun", num_sampling_steps=2))
    stochastic = pretrained.load_checkpoint_model(str(checkpoint[0]), sampler="maruyama", scale_0=0.9, scale_1=0.9)
    assert np.array_equal(stochastic.generate([1], seed=0, sampler="euler"), base)  # the scales are maruyama's
    with pytest.raises(ValueError, match="scale_0/scale_1 only apply to the maruyama sampler"):
        stochastic.generate([1], seed=0, sampler="euler", scale_0=0.9)
    with pytest.raises(TypeError, match="unknown sampling setting.s. steps; choose from sampler, num_sampling_steps"):
        pipe.generate([1], steps=3)


def test_an_mrar_checkpoint_returns_every_stage(tmp_path):
    settings = run_settings("--mrar", "--patch_size", "2")
    path = tmp_path / "mrar.pth"
    save_checkpoint(str(path), {"model": pretrained.build_model(settings).state_dict(), "args": settings})
    stages = pretrained.load_checkpoint_model(str(path)).generate([0, 1], return_stages=True)
    assert len(stages) == 4 and all(stage.shape == (2, 16, 16, 3) for stage in stages)


def test_a_misfit_names_the_settings_the_checkpoint_was_trained_with(checkpoint):
    path = checkpoint[0]
    with pytest.raises(ValueError) as refused:
        pretrained.load_checkpoint_model(str(path), class_num=10, buffer_size=8)
    lines = str(refused.value).splitlines()
    assert lines[0] == f"{path}: checkpoint does not fit the model:"
    assert "the checkpoint has 3 classes but the model 10: pass --class_num 3" in lines
    assert lines[-1] == ("the checkpoint was trained with --model transdiff_tiny --img_size 16 --patch_size 1 "
                         "--vae_embed_dim 12 --vae_stride 2 --class_num 3 --buffer_size 4 --tokenizer pixel")


def test_a_checkpoint_without_settings_needs_them_given(tmp_path, checkpoint):
    _, model, _, settings = checkpoint
    bare = tmp_path / "bare.pth"
    save_checkpoint(str(bare), {"model": model.state_dict()})
    with pytest.raises(ValueError, match=re.escape(f"{bare} stores no settings ('args'): pass the flags of its model")):
        pretrained.load_checkpoint_model(str(bare))
    given = {name: settings[name] for name in ("model", "tokenizer", "vae_stride", "vae_embed_dim", "img_size",
                                               "class_num", "buffer_size")}
    assert pretrained.load_checkpoint_model(str(bare), **given).model.num_classes == 3


def test_non_finite_weights_are_refused(tmp_path, checkpoint):
    _, model, _, settings = checkpoint
    weights = model.state_dict()
    weights["fake_latent"] = torch.full_like(weights["fake_latent"], float("nan"))
    broken = tmp_path / "nan.pth"
    save_checkpoint(str(broken), {"model": weights, "args": settings})
    with pytest.raises(ValueError, match="tensor fake_latent holds non-finite values"):
        pretrained.load_checkpoint_model(str(broken))


@pytest.mark.parametrize("name", sorted(SAMPLING_PRESETS))
def test_every_released_model_has_settings_that_build_it(name):
    settings = pretrained.default_settings() | pretrained.released_settings(name)
    preset = SAMPLING_PRESETS[name]
    assert (settings["cfg"], settings["scale_0"], settings["scale_1"]) == (preset.cfg, preset.scale_0, preset.scale_1)
    assert settings["patch_size"] == (2 if preset.mrar else 1) and settings["sampler"] == "maruyama"
    with torch.device("meta"):
        model = pretrained.build_model(settings)
    assert (model.mrar, model.img_size, model.num_classes) == (preset.mrar, preset.img_size, 1000)


def test_an_unknown_released_name_is_refused():
    with pytest.raises(ValueError, match="unknown released model 'transdiff_xl'; choose from transdiff_b, "):
        pretrained.load_pretrained("transdiff_xl")


def test_init_from_resolves_a_file_a_folder_or_refuses(tmp_path, checkpoint):
    path = checkpoint[0]
    assert pretrained.weights_file(str(path)) == str(path)
    assert pretrained.weights_file(str(path.parent)) == str(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint-4.pth in this folder"):
        pretrained.weights_file(str(path.parent), "4")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder, and not a released model "
                                                "\\(transdiff_b, transdiff_l, "):
        pretrained.weights_file("nowhere")


def test_load_pretrained_fetches_the_model_and_the_vae_and_samples_with_the_preset(tmp_path, monkeypatch):
    """The plumbing, with the Hub client replaced by local files (tests/unit/tools/test_download.py runs `fetch`
    against a local Hub) and a tiny stand-in of the released MRAR model's mode (a released size is gigabytes)."""
    import util.released

    settings = run_settings("--mrar", "--patch_size", "2", "--class_num", "1000")
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint(str(path), {"model": pretrained.build_model(settings).state_dict(), "args": settings})
    fetched = []

    def fetch(name):
        fetched.append(name)
        return tmp_path / "vae.ckpt" if name == "kl16" else path

    monkeypatch.setattr(util.released, "fetch", fetch)
    tiny = {name: settings[name] for name in ("model", "tokenizer", "vae_stride", "vae_embed_dim", "img_size",
                                              "buffer_size")}
    pipe = pretrained.load_pretrained("transdiff_l_mrar", **tiny)
    assert fetched == ["kl16", "transdiff_l_mrar"]
    assert pipe.settings["vae_path"] == str(tmp_path / "vae.ckpt") and pipe.model.mrar
    assert pipe.sampling() == {"sampler": "maruyama", "num_sampling_steps": 100, "cfg": 1.30, "cfg_interval": None,
                               "scale_0": 0.91, "scale_1": 0.93}
