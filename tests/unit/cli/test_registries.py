"""Each registry is the only place a new member is added: a sampler, a metric, a tokenizer, a preset."""
import json

import pytest
import torch

import main
from models.samplers import SAMPLERS, SamplerSpec, network_evaluations, ode_time_grid
from models.tokenizers import TOKENIZERS, build_tokenizer
from util.checkpoint import save_checkpoint
from util.eval.images import read_generated_images
from util.eval.registry import EVAL_METRICS
from util.presets import SAMPLING_PRESETS, apply_preset
from util.settings import get_args_parser

TINY = ("--model transdiff_tiny --tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --class_num 3 "
        "--buffer_size 4 --device cpu --num_workers 0").split()
EVAL = "--evaluate --num_images 6 --eval_bsz 4 --num_sampling_steps 3 --cfg 1.5".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model in the training checkpoint format."""
    args = get_args_parser().parse_args(TINY)
    torch.manual_seed(0)
    model = main.build_model(args)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 3,
                                "args": vars(args)})
    return path


def midpoint(velocity, x, t_steps, noise=None):
    """Explicit midpoint on dx/dt = v: two evaluations per step."""
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        half = (t_next - t_cur) / 2
        x = x + 2 * half * velocity(x + half * velocity(x, t_cur), t_cur + half)
    return x


def last_record(out):
    return json.loads((out / "metrics.json").read_text())[-1]


def test_a_sampler_added_to_the_registry_alone_runs_through_main_evaluate(tmp_path, checkpoint, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return midpoint(*args, **kwargs)

    monkeypatch.setitem(SAMPLERS, "midpoint", SamplerSpec(counted, ode_time_grid, stochastic=False,
                                                          evals_per_step=2))
    assert network_evaluations("midpoint", 3) == 6
    out = tmp_path / "eval"
    main.cli([*TINY, *EVAL, "--sampler", "midpoint", "--resume", str(checkpoint), "--output_dir", str(out),
              "--metrics", ""])
    record = last_record(out)
    assert record["sampler"] == "midpoint" and "-midpoint-" in record["folder"]
    images, labels = read_generated_images(record["folder"], 6, 3)
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(calls) == 2  # one call per generation batch (4 + 2 images)


class MeanBrightness:
    """A toy metric: the mean pixel value of the generated images."""

    name = "brightness"

    def __init__(self, settings):
        self.num_images, self.class_num = settings.num_images, settings.class_num
        self.checked = False

    def check(self):
        self.checked = True

    def compute(self, folder, device):
        assert self.checked
        images, _ = read_generated_images(folder, self.num_images, self.class_num)
        return {"mean_brightness": images.float().mean().item()}

    def sources(self):
        return {"brightness_scale": "uint8"}


def test_a_metric_added_to_the_registry_alone_is_in_the_evaluation_record(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(EVAL_METRICS, "brightness", MeanBrightness)
    out = tmp_path / "eval"
    main.cli([*TINY, *EVAL, "--resume", str(checkpoint), "--output_dir", str(out), "--metrics", "brightness"])
    record = last_record(out)
    assert 0.0 <= record["mean_brightness"] <= 255.0 and record["brightness_scale"] == "uint8"
    assert "metrics_skipped" not in record


def test_a_missing_metric_file_skips_that_metric_only(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(EVAL_METRICS, "brightness", MeanBrightness)
    out = tmp_path / "eval"
    main.cli([*TINY, *EVAL, "--resume", str(checkpoint), "--output_dir", str(out), "--metrics", "fid_is,brightness",
              "--fid_stats", str(tmp_path / "absent.npz")])
    record = last_record(out)
    assert "absent.npz" in record["metrics_skipped"]["fid_is"] and "mean_brightness" in record


def test_tokenizer_choices_and_weightless_build_come_from_the_spec():
    assert sorted(TOKENIZERS) == sorted(get_args_parser()._option_string_actions["--tokenizer"].choices)
    empty = build_tokenizer("kl16", vae_path=None, with_weights=False)
    assert all(p.is_meta for p in empty.parameters()) and empty.latent_scale == TOKENIZERS["kl16"].build_empty(
        16, 3).latent_scale
    moments = torch.randn(2, 32, 4, 4)
    assert empty.posterior_from_moments(moments).mean.shape == (2, 16, 4, 4)


@pytest.mark.parametrize("name", sorted(SAMPLING_PRESETS))
def test_every_preset_applies_to_its_own_model_only(name):
    preset = SAMPLING_PRESETS[name]
    settings = apply_preset(name, model=preset.model, mrar=preset.mrar, img_size=preset.img_size,
                            sampler="maruyama")
    assert settings == (preset.cfg, preset.scale_0, preset.scale_1)
    with pytest.raises(ValueError, match=f"--preset {name} is for"):
        apply_preset(name, model=preset.model, mrar=not preset.mrar, img_size=preset.img_size, sampler="maruyama")
