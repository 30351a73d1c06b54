"""util.eval.layout: an evaluation's conventions pinned as formulas: image i's class and noise, the folder's name
and digest, and the manifest that keeps two evaluations apart."""
import json

import numpy as np
import pytest
import torch

from util.eval.layout import NOISE, Evaluation, claim_folder, identity_digest, image_class, image_key, image_noise

SHAPE = (3, 4, 2)


def test_class_major_order():
    assert [image_class(i, 50000, 1000) for i in (0, 49, 50, 49999)] == [0, 0, 1, 999]
    with pytest.raises(ValueError, match="multiple of class_num"):
        image_class(0, 50001, 1000)
    with pytest.raises(IndexError):
        image_class(50000, 50000, 1000)


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
