"""util.checkpoint and util.run_state: atomic save, safe load, resume lookup, weight selection, finetune adaptation."""
import argparse
import logging
import os
import zipfile

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
    assert sorted(loaded) == ["args", "epoch", "model"] and loaded["epoch"] == 7
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert loaded["args"] == {"lr": 1e-4, "model": "transdiff_base"}
    assert _listing(path.parent) == ["checkpoint-last.pth"]
    stored = torch.load(path, weights_only=True)  # no Namespace allowed here: the file holds a plain dict
    assert stored["args"] == {"lr": 1e-4, "model": "transdiff_base"}


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
    temporary file; the next start removes those, and only those (metrics.json's is an evaluation's)."""
    left = [".checkpoint-last.pth.a1.tmp", ".args.json.b2.tmp", ".log.jsonl.c3.tmp", ".metrics.json.d4.tmp"]
    for name in left:
        (tmp_path / name).write_bytes(b"partial")
    logger = logging.getLogger("test_training_start")
    main.start_training_run(argparse.Namespace(output_dir=str(tmp_path)), logger, start_epoch=0)
    assert _listing(tmp_path) == [".metrics.json.d4.tmp"]


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
    assert "weights_only=False" not in message


@pytest.mark.parametrize("content, error", [(b"", "EOFError()"), (b"hello, not a checkpoint", "KeyError(101)")])
def test_load_rejects_non_checkpoint_files(tmp_path, content, error):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        ck.load_checkpoint(str(path))
    assert str(info.value) == f"{path} is not a PyTorch checkpoint (or is truncated): {error}"


def test_a_zip_whose_records_cannot_be_read_is_refused_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ck.save_checkpoint(str(path), {"model": {"w": torch.ones(2)}})

    def unreadable(archive):
        raise zipfile.BadZipFile("Bad magic number for file header")

    monkeypatch.setattr(zipfile.ZipFile, "testzip", unreadable)
    with pytest.raises(ValueError) as info:
        ck.load_checkpoint(str(path))
    assert str(info.value) == (f"{path} is not a PyTorch checkpoint (or is truncated): "
                               "BadZipFile('Bad magic number for file header')")


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
    many = {f"k{i:02d}": i for i in range(12)}
    with pytest.raises(ValueError) as info:
        ck.select_weights(many)
    assert str(info.value) == ("no weights in checkpoint: expected 'model', 'model_ema' or a bare state dict, found "
                               f"keys {[f'k{i:02d}' for i in range(10)]}")


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
    assert report == ["mask_token: [1, 1, 8] -> [1, 64, 8], token copied to all 64 slots"] + [
        f"z_proj.{name}: checkpoint {source} vs model {target}, kept the model's fresh initialisation (z_proj is "
        "untrained in the 1-step model)" for name, source, target in (("weight", [8, 16], [8, 64]), ("bias", [8], [8]))]
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


# ------------------------------------------------------------------------------ the mismatch explanation, pinned
def mismatch(src, target, model_for_width=None) -> str:
    with pytest.raises(ValueError) as info:
        ck.adapt_state_dict(src, target, model_for_width)
    return str(info.value)


def test_the_explanation_of_another_width_lists_every_tensor():
    src, target = _toy_sd(width=8), _toy_sd(width=12, mask_slots=64)  # the mask token is not broadcast across widths
    assert mismatch(src, target, {8: "toy_small"}).split("\n") == [
        "checkpoint does not fit the model:",
        "checkpoint width 8 but model width 12: pass --model toy_small",
        "shape mismatches (8): fake_latent: checkpoint [1, 8] vs model [1, 12]; mask_token: checkpoint [1, 1, 8] vs "
        "model [1, 64, 12]; encoder_pos_embed_learned: checkpoint [1, 20, 8] vs model [1, 20, 12]; z_proj.weight: "
        "checkpoint [8, 16] vs model [12, 16]; z_proj.bias: checkpoint [8] vs model [12]; "
        "encoder_blocks.0.attn.qkv.weight: checkpoint [24, 8] vs model [36, 12]; encoder_norm.weight: checkpoint [8] "
        "vs model [12]; diffdecoder.net.diffusion_pos_embed_learned: checkpoint [1, 16, 8] vs model [1, 16, 12]"]


def test_the_width_is_read_from_the_encoder_norm_without_a_fake_latent():
    src, target = _toy_sd(width=8), _toy_sd(width=12)
    del src["fake_latent"], target["fake_latent"]
    assert mismatch(src, target).split("\n")[1] == ("checkpoint width 8 but model width 12: did you pass the right "
                                                   "--model?")
    del src["encoder_norm.weight"]
    assert "checkpoint width" not in mismatch(src, target)


def test_the_width_is_read_from_the_fake_latent_alone():
    src, target = _toy_sd(width=8), _toy_sd(width=12)
    del src["encoder_norm.weight"], target["encoder_norm.weight"]
    assert mismatch(src, target).split("\n")[1] == ("checkpoint width 8 but model width 12: did you pass the right "
                                                   "--model?")


def test_the_explanation_of_other_blocks_and_classes():
    src, target = _toy_sd(), _toy_sd()
    src["class_emb.weight"], target["class_emb.weight"] = torch.zeros(3, 8), torch.zeros(5, 8)
    src["encoder_blocks.1.attn.qkv.weight"] = torch.zeros(24, 8)
    assert mismatch(src, target).split("\n") == [
        "checkpoint does not fit the model:",
        "checkpoint has 2 encoder blocks but the model has 1: did you pass the right --model?",
        "the checkpoint has 3 classes but the model 5: pass --class_num 3",
        "shape mismatches (1): class_emb.weight: checkpoint [3, 8] vs model [5, 8]",
        "unexpected in checkpoint (1): encoder_blocks.1.attn.qkv.weight"]
    src["encoder_blocks.1.attn.qkv.weight"], target["encoder_blocks.1.attn.qkv.weight"] = (
        torch.zeros(24, 8), torch.zeros(24, 8))
    assert "encoder blocks" not in mismatch(src, target)  # the same count of blocks
    target["class_emb.weight"] = torch.zeros(3, 7)
    assert "classes" not in mismatch(src, target)  # the same count of classes, another width


@pytest.mark.parametrize("src_slots, target_slots, says_mrar", [(2, 1, True), (64, 1, True), (1, 1, False)])
def test_an_mrar_checkpoint_is_named_from_two_mask_slots_on(src_slots, target_slots, says_mrar):
    src, target = _toy_sd(mask_slots=src_slots), _toy_sd(mask_slots=target_slots)
    target["extra.weight"] = torch.zeros(1)  # something else to mismatch
    assert ("the checkpoint is an MRAR model (mask_token [1, " in mismatch(src, target)) is says_mrar


@pytest.mark.parametrize("count, shown", [(20, 20), (21, 20), (25, 20)])
def test_long_lists_show_twenty_and_count_the_rest(count, shown):
    src = {**_toy_sd(), **{f"extra.{i:02d}": torch.zeros(1) for i in range(count)}}
    line = mismatch(src, _toy_sd()).split("\n")[-1]
    names = "; ".join(f"extra.{i:02d}" for i in range(shown))
    rest = f"; ... and {count - 20} more" if count > 20 else ""
    assert line == f"unexpected in checkpoint ({count}): {names}{rest}"


def test_only_a_mask_token_of_one_slot_and_the_same_width_is_broadcast_and_any_nested_one():
    src, target = _toy_sd(), _toy_sd(mask_slots=4)
    src["decoder.mask_token"], target["decoder.mask_token"] = torch.ones(1, 1, 8), torch.zeros(1, 4, 8)
    adapted, report = ck.adapt_state_dict(src, target)
    assert torch.equal(adapted["decoder.mask_token"], torch.ones(1, 4, 8))
    assert report[1] == "decoder.mask_token: [1, 1, 8] -> [1, 4, 8], token copied to all 4 slots"
    for source, wanted in ((torch.ones(1, 2, 8), torch.zeros(1, 4, 8)), (torch.ones(2, 1, 8), torch.zeros(2, 4, 8)),
                           (torch.ones(1, 1, 6), torch.zeros(1, 4, 8)), (torch.ones(1, 8), torch.zeros(4, 8))):
        src["mask_token"], target["mask_token"] = source, wanted
        assert "mask_token: checkpoint" in mismatch(src, target)


def test_a_position_embedding_that_is_not_a_batch_of_one_square_grid_is_not_resized():
    for source, wanted in ((torch.zeros(1, 16), torch.zeros(1, 64)), (torch.zeros(2, 16, 8), torch.zeros(2, 64, 8)),
                           (torch.zeros(1, 16, 8), torch.zeros(1, 64, 6))):
        src, target = _toy_sd(), _toy_sd()
        src["x.pos_embed"], target["x.pos_embed"] = source, wanted
        assert "x.pos_embed: checkpoint" in mismatch(src, target)


def test_a_resized_position_embedding_keeps_its_dtype():
    src, target = _toy_sd(dec_len=4), _toy_sd(dec_len=16)
    src["diffdecoder.net.diffusion_pos_embed_learned"] = src["diffdecoder.net.diffusion_pos_embed_learned"].bfloat16()
    adapted, _ = ck.adapt_state_dict(src, target)
    assert adapted["diffdecoder.net.diffusion_pos_embed_learned"].dtype == torch.bfloat16


class _Other:
    """A second class outside the allow-list."""


def test_the_refusal_of_pickled_objects_names_them_and_gives_no_unsafe_advice(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"model": {}, "a": _Opaque(), "b": _Other()}, path)
    with pytest.raises(ValueError) as info:
        ck.load_checkpoint(str(path))
    assert str(info.value) == (
        f"{path} contains pickled Python objects outside the allow-list (tests.unit.util.test_checkpoint._Opaque, "
        "tests.unit.util.test_checkpoint._Other). We refuse to unpickle arbitrary objects because that can execute "
        "code. If you trust the file, convert it once to tensors, state dicts and plain Python values "
        "(docs/reliability.md#foreign-checkpoints).")
    legacy = tmp_path / "legacy.pth"
    torch.save({"a": _Opaque()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError) as info:
        ck.load_checkpoint(str(legacy))
    assert str(info.value) == (f"{legacy} is not a PyTorch checkpoint in the zip format: it is truncated or foreign "
                               "bytes, or a legacy pickle, which we refuse to unpickle because that can execute code")


def test_the_first_non_finite_tensor_is_named():
    state = {"a": torch.ones(2), "n": torch.tensor([1, 2]), "b": torch.tensor([0.0, float("nan")]),
             "c": torch.tensor([float("inf")])}
    assert ck.first_non_finite(state) == "b" and ck.first_non_finite({"a": torch.ones(1), "s": "text"}) is None
    with pytest.raises(ValueError, match="^weights.pth: tensor b holds non-finite values \\(NaN or infinity\\); the "
                                         "file is corrupt or its run diverged$"):
        ck.check_finite(state, "weights.pth")
    ck.check_finite({"a": torch.ones(1, dtype=torch.bfloat16)}, "fine.pth")


def test_a_flipped_byte_anywhere_in_the_tensors_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    ck.save_checkpoint(str(path), {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "epoch": 3})
    assert ck.load_checkpoint(str(path))["epoch"] == 3
    data = bytearray(path.read_bytes())
    offset = data.index(torch.arange(4096, dtype=torch.float32)[2000:2001].numpy().tobytes())
    data[offset] ^= 0x01  # one bit of one weight
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"^{damaged} is corrupt: its record .*/data/0 fails its CRC-32 checksum, so "
                                         "bytes changed after it was written; use another copy or another checkpoint "
                                         "of the run$"):
        ck.load_checkpoint(str(damaged))
