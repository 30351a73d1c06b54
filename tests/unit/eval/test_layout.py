"""util.eval.layout: an evaluation's conventions pinned as formulas: image i's class and noise, the folder's name
and digest, and the manifest that keeps two evaluations apart."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.samplers import DEFAULT_SAMPLER
from util.eval.layout import (
    NOISE,
    Evaluation,
    claim_folder,
    class_indices,
    identity_digest,
    image_class,
    image_key,
    image_noise,
    image_path,
    is_complete_png,
)

SHAPE = (3, 4, 2)


def test_class_major_order():
    assert [image_class(i, 50000, 1000) for i in (0, 49, 50, 49999)] == [0, 0, 1, 999]
    with pytest.raises(ValueError, match="multiple of class_num"):
        image_class(0, 50001, 1000)
    with pytest.raises(IndexError):
        image_class(50000, 50000, 1000)


def test_class_indices_invert_the_class_major_order():
    assert [list(class_indices(label, 6, 3)) for label in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert all(image_class(index, 12, 4) == label for label in range(4) for index in class_indices(label, 12, 4))
    with pytest.raises(ValueError, match="multiple of class_num"):
        class_indices(0, 7, 3)
    for label in (-1, 3):
        with pytest.raises(IndexError, match=f"class {label} outside"):
            class_indices(label, 6, 3)


def test_the_noise_key_holds_the_seed_and_the_index_whole():
    assert image_key(1, 5) == (1 << 64) | 5
    assert image_key(2**40 + 3, 7) == ((2**40 + 3) << 64) | 7  # seeds above 32 bits still count
    assert image_key(-1, 0) == (2**64 - 1) << 64
    keys = {image_key(seed, index) for seed in (0, 1, 2, 2**32, 2**32 + 1) for index in range(1000)}
    assert len(keys) == 5 * 1000  # no two (seed, index) pairs share a stream


def test_an_images_noise_is_numpys_philox_of_its_key_whatever_its_batch():
    batch = image_noise(7, [3, 4, 5])
    first, second = (batch.randn((3, *SHAPE), device="cpu", dtype=torch.float32) for _ in range(2))
    stream = np.random.Generator(np.random.Philox(key=image_key(7, 4)))
    assert np.array_equal(first[1].numpy(), stream.standard_normal(SHAPE, dtype=np.float32))
    assert np.array_equal(second[1].numpy(), stream.standard_normal(SHAPE, dtype=np.float32))  # the stream goes on
    alone = image_noise(7, [4]).randn((1, *SHAPE), device="cpu", dtype=torch.float32)
    assert torch.equal(alone[0], first[1])


def test_another_seed_shares_no_image_noise():
    one = image_noise(1, range(64)).randn((64, *SHAPE), device="cpu", dtype=torch.float32).flatten(1)
    two = image_noise(2, range(64)).randn((64, *SHAPE), device="cpu", dtype=torch.float32).flatten(1)
    both = torch.cat([one, two])
    assert len({tuple(row.tolist()) for row in both}) == 128  # pairwise distinct within and across seeds


def evaluation(**changes):
    fields = dict(weights_digest="ab" * 32, tokenizer_digest="cd" * 32, ema=True, checkpoint="ckpt/x.pth", epoch="7",
                  seed=1, model="transdiff_tiny", mrar=False, patch_size=1, img_size=16, class_num=2,
                  tokenizer="pixel", vae_stride=2, vae_embed_dim=12, sampler="euler", num_sampling_steps=10, cfg=1.5,
                  scale_0=1.0, scale_1=1.0, cfg_interval=None, num_images=4, precision="fp32", standalone=True)
    return Evaluation(**{**fields, **changes})


def test_folder_name_and_record():
    spec = evaluation()
    digest = identity_digest(spec.identity())[:8]
    assert spec.folder("out") == f"out/epoch7-diffsteps10-cfg1.5-image4-scale1.0-1.0-euler-{digest}_ema_evaluate"
    assert spec.identity()["noise"] == spec.record()["noise"] == NOISE
    assert spec.record()["images_per_class"] == 2
    assert evaluation(seed=2).folder("out") != spec.folder("out")
    assert evaluation(checkpoint="elsewhere.pth").folder("out") == spec.folder("out")  # the weights' digest decides


def test_a_folder_of_another_evaluation_is_refused(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    claim_folder(str(folder), evaluation().identity(), {"source": "a"})
    claim_folder(str(folder), evaluation().identity(), {"source": "b"})  # the same evaluation continues
    with pytest.raises(ValueError, match="another evaluation \\(differing: seed\\)"):
        claim_folder(str(folder), evaluation(seed=2).identity(), {})
    assert json.loads((folder / "manifest.json").read_text())["source"] == "a"
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "00000.png").write_bytes(b"")
    with pytest.raises(ValueError, match="holds images but no manifest.json"):
        claim_folder(str(loose), evaluation().identity(), {})


IDENTITY = {"weights_digest": "ab" * 32, "weights": "ema", "tokenizer_digest": "cd" * 32, "seed": 1,
            "model": "transdiff_tiny", "mrar": False, "patch_size": 1, "img_size": 16, "class_num": 2,
            "tokenizer": "pixel", "vae_stride": 2, "vae_embed_dim": 12, "sampler": "euler", "num_sampling_steps": 10,
            "cfg": 1.5, "scale_0": 1.0, "scale_1": 1.0, "cfg_interval": None, "num_images": 4, "precision": "fp32",
            "noise": "philox(key=(seed mod 2**64) << 64 | index), numpy standard_normal float32"}


def test_the_identity_and_the_record_are_pinned_field_by_field():
    """Renaming or dropping a field renames every existing evaluation folder and orphans its images."""
    assert evaluation().identity() == IDENTITY
    assert evaluation(ema=False).identity()["weights"] == "raw"
    assert list(evaluation().record().items()) == [
        ("epoch", "7"), ("checkpoint", "ckpt/x.pth"), ("ema", True), ("weights_digest", "ab" * 32),
        ("sampler", "euler"), ("num_sampling_steps", 10), ("cfg", 1.5), ("cfg_interval", None), ("scale_0", 1.0),
        ("scale_1", 1.0), ("precision", "fp32"), ("seed", 1), ("noise", IDENTITY["noise"]), ("num_images", 4),
        ("images_per_class", 2)]


def test_the_folder_digest_is_sha256_of_the_sorted_json_and_pinned():
    assert identity_digest({"b": (1, 2), "a": 1}) == hashlib.sha256(b'{"a": 1, "b": [1, 2]}').hexdigest()
    assert identity_digest({"a": Path("x")}) == hashlib.sha256(b'{"a": "x"}').hexdigest()  # str() of the rest
    assert identity_digest(IDENTITY)[:8] == "bd09a2b4"  # the name existing folders carry: change it knowingly


@pytest.mark.parametrize("field, value", [("weights_digest", "ef" * 32), ("tokenizer_digest", "01" * 32),
                                          ("ema", False), ("seed", 2), ("model", "transdiff_small"),
                                          ("mrar", True), ("patch_size", 2), ("img_size", 32), ("class_num", 4),
                                          ("tokenizer", "kl16"), ("vae_stride", 16), ("vae_embed_dim", 16),
                                          ("sampler", "maruyama"), ("num_sampling_steps", 11), ("cfg", 1.6),
                                          ("scale_0", 0.5), ("scale_1", 0.5), ("cfg_interval", (0.1, 0.9)),
                                          ("num_images", 8), ("precision", "bf16")])
def test_every_setting_that_changes_the_images_changes_the_folder(field, value):
    assert evaluation(**{field: value}).folder("out") != evaluation().folder("out")


def test_the_folders_readable_part():
    assert evaluation(cfg=[1.5, 2.0], ema=False, standalone=False).folder("out").startswith(
        "out/epoch7-diffsteps10-cfg1.5,2.0-image4-scale1.0-1.0-euler-")  # one cfg per stage, comma-separated
    online = evaluation(sampler=DEFAULT_SAMPLER, ema=False, standalone=False).folder("out")
    digest = identity_digest(evaluation(sampler=DEFAULT_SAMPLER, ema=False).identity())[:8]
    assert online == f"out/epoch7-diffsteps10-cfg1.5-image4-scale1.0-1.0-{digest}"  # the default sampler goes unnamed


def test_a_new_folder_gets_its_manifest_and_a_foreign_manifest_names_every_difference(tmp_path):
    folder = tmp_path / "new" / "eval"
    claim_folder(str(folder), IDENTITY, {"epoch": "7"})
    assert json.loads((folder / "manifest.json").read_text()) == {"identity": IDENTITY, "epoch": "7"}
    other = {**IDENTITY, "seed": 2, "cfg": 3.0}
    with pytest.raises(ValueError, match=r"^.*eval holds images of another evaluation \(differing: cfg, seed\); "
                                         r"move it away or choose another --output_dir$"):
        claim_folder(str(folder), other, {})
    extra = {**IDENTITY, "new_setting": 1}
    with pytest.raises(ValueError, match=r"differing: new_setting\)"):
        claim_folder(str(folder), extra, {})
    with pytest.raises(ValueError, match=r"differing: cfg_interval\)"):  # tuples compare as the JSON lists they are
        claim_folder(str(folder), {**IDENTITY, "cfg_interval": (0.1, 0.9)}, {})
    tupled = tmp_path / "tupled"
    claim_folder(str(tupled), {**IDENTITY, "cfg_interval": (0.1, 0.9)}, {})
    claim_folder(str(tupled), {**IDENTITY, "cfg_interval": (0.1, 0.9)}, {})  # read back as a list, still the same


def test_a_folder_without_a_manifest_is_claimed_only_when_it_holds_no_images(tmp_path):
    folder = tmp_path / "other_files"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    claim_folder(str(folder), IDENTITY, {})
    assert (folder / "manifest.json").is_file()
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "00003.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^.*loose holds images but no manifest\.json, so what made them is unknown; "
                                         r"move it away or choose another --output_dir$"):
        claim_folder(str(loose), IDENTITY, {})
    assert not (loose / "manifest.json").exists()


def test_image_paths_and_complete_pngs(tmp_path):
    assert image_path("f", 7) == os.path.join("f", "00007.png")
    assert image_path("f", 123456) == os.path.join("f", "123456.png")
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(whole)
    assert is_complete_png(str(whole), 16)
    assert not is_complete_png(str(whole), 32)  # another size
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:400])
    assert not is_complete_png(str(truncated), 16)
    assert not is_complete_png(str(tmp_path / "missing.png"), 16)
    (tmp_path / "text.png").write_text("not an image")
    assert not is_complete_png(str(tmp_path / "text.png"), 16)


def test_image_key_bounds():
    assert image_key(0, 2**64 - 1) == 2**64 - 1
    assert image_key(2**64 + 5, 0) == 5 << 64  # the seed is taken mod 2**64
    for index in (-1, 2**64):
        with pytest.raises(ValueError, match=r"image index .* outside \[0, 2\*\*64\)"):
            image_key(0, index)
    with pytest.raises(IndexError, match=r"image index -1 outside \[0, 4\)"):
        image_class(-1, 4, 2)
    assert [image_class(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]


def test_a_manifest_without_an_identity_or_with_values_json_lacks(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps({"epoch": "7"}))
    with pytest.raises(ValueError, match=r"differing: cfg, class_num, img_size"):
        claim_folder(str(bare), IDENTITY, {})
    pathlike = {**IDENTITY, "tokenizer": Path("vae/kl16.ckpt")}  # written and compared as its str()
    claim_folder(str(tmp_path / "pathlike"), pathlike, {})
    claim_folder(str(tmp_path / "pathlike"), pathlike, {})
    assert type(evaluation(num_images=6, class_num=3).record()["images_per_class"]) is int


@pytest.mark.parametrize("text, message", [
    ('{"identity": {"cfg": 1.5', r"manifest.json is not valid JSON \(.*\): it is truncated or was edited"),
    ("[1, 2]", r"manifest.json holds a JSON list, not a manifest; move .* away or choose another --output_dir"),
])
def test_a_torn_or_foreign_manifest_is_refused_naming_it(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=f"^{tmp_path}/{message}"):
        claim_folder(str(tmp_path), IDENTITY, {})
    assert (tmp_path / "manifest.json").read_text() == text
