"""util.checkpoint and util.run_state: atomic save, safe load, resume lookup, weight selection, finetune adaptation."""
import argparse
import logging
import os

import pytest
import torch

import main
from models.transdiff import TRANSDIFF_MODELS
from util import checkpoint as ck
from util import run_state
from util.io import atomic_write


class _Opaque:
    """A class outside the unpickling allow-list."""


TINY_MODEL = dict(img_size=16, vae_stride=2, vae_embed_dim=12, class_num=3, buffer_size=4)


def _listing(directory):
    return sorted(os.listdir(directory))


def test_save_and_load_round_trip_stores_args_as_dict(tmp_path):
    path = tmp_path / "out" / "checkpoint-last.pth"
    ck.save_checkpoint(str(path), {"model": {"w": torch.arange(3.0)}, "epoch": 7,
                                   "args": argparse.Namespace(lr=1e-4, model="transdiff_base")})
    loaded = ck.load_checkpoint(str(path))
    assert loaded["epoch"] == 7
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert loaded["args"] == {"lr": 1e-4, "model": "transdiff_base"}
    assert _listing(path.parent) == ["checkpoint-last.pth"]


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ck.save_checkpoint(str(path), {"epoch": 1})
    before = path.read_bytes()

    def crash_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(str(path), {"epoch": 2})
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["checkpoint-last.pth"]
    monkeypatch.undo()
    assert ck.load_checkpoint(str(path))["epoch"] == 1


def test_atomic_write_gives_normal_permissions_and_cleans_up_on_error(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.bin"), lambda handle: handle.write(b"abc"), durable=False)
    finally:
        os.umask(mask)
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644

    def fail(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "a.bin"), fail)
    assert _listing(tmp_path) == ["a.bin"]
    assert (tmp_path / "a.bin").read_bytes() == b"abc"


def test_a_training_start_removes_the_temporary_files_of_its_own_killed_writes_only(tmp_path):
    """A SIGKILL inside any atomic write of a training run (a checkpoint, args.json, a log.jsonl rewrite) leaves a
    temporary file; the next start removes those. An evaluation's (metrics.json) may be a live writer's: kept."""
    left = [".checkpoint-last.pth.a1.tmp", ".args.json.b2.tmp", ".log.jsonl.c3.tmp", ".metrics.json.d4.tmp"]
    for name in left:
        (tmp_path / name).write_bytes(b"partial")
    logger = logging.getLogger("test_training_start")
    main.start_training_run(argparse.Namespace(output_dir=str(tmp_path)), logger, start_epoch=0)
    assert _listing(tmp_path) == [".metrics.json.d4.tmp", "args.json"]


def test_load_original_format_with_namespace_args(tmp_path):
    path = tmp_path / "orig.pth"
    # Written exactly as the original's misc.save_model does: plain torch.save with a Namespace.
    torch.save({"model": {"w": torch.ones(2)}, "model_ema": {"w": torch.zeros(2)}, "epoch": 799,
                "args": argparse.Namespace(blr=1e-4, mrar=False), "optimizer": {"state": {}, "param_groups": []}},
               path)
    loaded = ck.load_checkpoint(str(path))
    assert loaded["args"] == {"blr": 1e-4, "mrar": False}
    assert loaded["epoch"] == 799


def test_load_refuses_disallowed_globals_with_clear_error(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": _Opaque()}, path)
    with pytest.raises(ValueError) as info:
        ck.load_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "refuse to unpickle arbitrary objects" in message
    assert "_Opaque" in message
    assert "weights_only=False" in message


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint"])
def test_load_rejects_non_checkpoint_files(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="junk.pth is not a PyTorch checkpoint"):
        ck.load_checkpoint(str(path))


def test_load_rejects_non_dict_and_missing_file(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(1), path)
    with pytest.raises(TypeError, match="not a checkpoint dict"):
        ck.load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ck.load_checkpoint(str(tmp_path / "nope.pth"))


def test_checkpoint_paths_use_original_names(tmp_path):
    assert run_state.checkpoint_path(str(tmp_path), run_state.LAST) == os.path.join(str(tmp_path),
                                                                                   "checkpoint-last.pth")
    assert run_state.checkpoint_path(str(tmp_path), 50) == os.path.join(str(tmp_path), "checkpoint-50.pth")


def test_find_resume_checkpoint(tmp_path):
    assert run_state.find_resume_checkpoint(None) is None
    assert run_state.find_resume_checkpoint(str(tmp_path)) is None  # empty directory
    assert run_state.find_resume_checkpoint(str(tmp_path / "not_created_yet")) is None
    last = tmp_path / "checkpoint-last.pth"
    last.write_bytes(b"x")
    assert run_state.find_resume_checkpoint(str(tmp_path)) == str(last)
    other = tmp_path / "weights.pth"
    other.write_bytes(b"x")
    assert run_state.find_resume_checkpoint(str(other)) == str(other)
    assert run_state.find_resume_checkpoint(str(tmp_path), load_step=50) is None
    (tmp_path / "checkpoint-50.pth").write_bytes(b"x")
    assert run_state.find_resume_checkpoint(str(tmp_path), load_step=50) == str(tmp_path / "checkpoint-50.pth")


def test_select_weights():
    model, ema = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    assert ck.select_weights({"model": model, "model_ema": ema}) == (ema, "model_ema")
    assert ck.select_weights({"model": model, "model_ema": ema}, use_ema=False) == (model, "model")
    assert ck.select_weights({"model": model, "epoch": 3}) == (model, "model")
    assert ck.select_weights({"module.w": torch.ones(1)}) == ({"w": torch.ones(1)}, "state_dict")
    stripped, _ = ck.select_weights({"model": {"module._orig_mod.a.b": torch.ones(1)}})
    assert list(stripped) == ["a.b"]
    with pytest.raises(ValueError, match="no weights"):
        ck.select_weights({"epoch": 3, "args": {}})


def _toy_sd(width=8, mask_slots=1, z_in=16, dec_len=16):
    gen = torch.Generator().manual_seed(width * 1000 + mask_slots + z_in + dec_len)
    shapes = {
        "fake_latent": [1, width],
        "mask_token": [1, mask_slots, width],
        "encoder_pos_embed_learned": [1, 20, width],
        "z_proj.weight": [width, z_in],
        "z_proj.bias": [width],
        "encoder_blocks.0.attn.qkv.weight": [3 * width, width],
        "encoder_norm.weight": [width],
        "diffdecoder.net.diffusion_pos_embed_learned": [1, dec_len, width],
    }
    return {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}


def test_adapt_identical_shapes_is_identity():
    src = _toy_sd()
    adapted, report = ck.adapt_state_dict(src, _toy_sd())
    assert report == []
    assert all(adapted[key] is src[key] for key in src)


def test_adapt_mask_token_is_broadcast_to_all_slots():
    src, target = _toy_sd(), _toy_sd(mask_slots=64)
    adapted, report = ck.adapt_state_dict(src, target)
    assert adapted["mask_token"].shape == (1, 64, 8)
    assert torch.equal(adapted["mask_token"], src["mask_token"].repeat(1, 64, 1))
    assert any(line.startswith("mask_token:") for line in report)


def test_adapt_keeps_fresh_z_proj_when_input_width_changes():
    src, target = _toy_sd(), _toy_sd(mask_slots=64, z_in=64)
    adapted, report = ck.adapt_state_dict(src, target)
    assert torch.equal(adapted["z_proj.weight"], target["z_proj.weight"])
    assert torch.equal(adapted["z_proj.bias"], target["z_proj.bias"])
    assert not torch.equal(adapted["z_proj.bias"], src["z_proj.bias"])
    assert sum(line.startswith("z_proj.") for line in report) == 2
    assert torch.equal(adapted["encoder_blocks.0.attn.qkv.weight"], src["encoder_blocks.0.attn.qkv.weight"])


def test_adapt_interpolates_square_pos_embed():
    src, target = _toy_sd(dec_len=16), _toy_sd(dec_len=64)
    src["diffdecoder.net.diffusion_pos_embed_learned"][..., 0] = 0.75  # constant channel over the grid
    adapted, report = ck.adapt_state_dict(src, target)
    resized = adapted["diffdecoder.net.diffusion_pos_embed_learned"]
    assert resized.shape == (1, 64, 8)
    assert torch.allclose(resized[..., 0], torch.full((1, 64), 0.75), atol=1e-6)
    assert not torch.allclose(resized[..., 1], resized[..., 1].mean())  # other channels keep structure
    assert report == [("diffdecoder.net.diffusion_pos_embed_learned: [1, 16, 8] -> [1, 64, 8], "
                       "bicubic interpolation of the 4x4 grid")]


def test_adapt_pos_embed_interpolation_is_bicubic_over_the_grid():
    src, target = _toy_sd(dec_len=4), _toy_sd(dec_len=16)
    adapted, _ = ck.adapt_state_dict(src, target)
    grid = src["diffdecoder.net.diffusion_pos_embed_learned"].reshape(1, 2, 2, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(adapted["diffdecoder.net.diffusion_pos_embed_learned"],
                          expected.permute(0, 2, 3, 1).reshape(1, 16, 8))


def test_adapt_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint width 8 but model width 12: did you pass the right --model"):
        ck.adapt_state_dict(_toy_sd(width=8), _toy_sd(width=12))
    with pytest.raises(ValueError, match="checkpoint width 8 but model width 12: pass --model toy_small"):
        ck.adapt_state_dict(_toy_sd(width=8), _toy_sd(width=12), {8: "toy_small"})


def test_adapt_non_square_pos_embed_mismatch_raises():
    src, target = _toy_sd(), _toy_sd()
    target["encoder_pos_embed_learned"] = torch.zeros(1, 30, 8)
    with pytest.raises(ValueError, match=r"encoder_pos_embed_learned: checkpoint \[1, 20, 8\] vs model \[1, 30, 8\]"):
        ck.adapt_state_dict(src, target)


def test_adapt_missing_and_unexpected_keys_raise():
    src, target = _toy_sd(), _toy_sd()
    src["extra.weight"] = torch.zeros(1)
    del src["encoder_norm.weight"]
    with pytest.raises(ValueError) as info:
        ck.adapt_state_dict(src, target)
    assert "missing in checkpoint (1): encoder_norm.weight" in str(info.value)
    assert "unexpected in checkpoint (1): extra.weight" in str(info.value)


def test_adapt_mrar_checkpoint_into_one_step_model_says_pass_mrar():
    with pytest.raises(ValueError, match="add --mrar --patch_size 2"):
        ck.adapt_state_dict(_toy_sd(mask_slots=64, z_in=64), _toy_sd())


# ------------------------------------------------------------------------------ released-style checkpoints
def test_released_style_checkpoint_loads_with_weights_only(tmp_path):
    model = TRANSDIFF_MODELS["transdiff_tiny"](**TINY_MODEL)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "model_ema": {k: v + 1 for k, v in model.state_dict().items()},
                "epoch": 799, "args": argparse.Namespace(model="transdiff_tiny", mrar=False)}, path)
    checkpoint = ck.load_checkpoint(str(path))  # torch.load(weights_only=True) with an allow-list
    assert checkpoint["args"] == {"model": "transdiff_tiny", "mrar": False} and checkpoint["epoch"] == 799
    fresh = TRANSDIFF_MODELS["transdiff_tiny"](**TINY_MODEL)
    weights, source = ck.select_weights(checkpoint, use_ema=True)
    fresh.load_state_dict(weights, strict=True)
    assert source == "model_ema"
    assert torch.equal(fresh.fake_latent, model.fake_latent + 1)
