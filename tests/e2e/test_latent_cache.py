"""main_cache.py's sharded cache end to end: an interrupted run resumes and ends complete, and main.py trains MRAR
from the cache (pixel tokenizer, tiny images, CPU)."""
import os

import pytest
import torch

import main_cache
from tests.support.runs import CLASSES, IMAGES_PER_CLASS, TINY, load_state, run
from tools.build_mrar_index import build_mrar_index
from util.data import latent_cache
from util.data.latent_cache import INDEX, SHARDS, complete_shards, open_latent_cache

CACHE_FLAGS = ("--tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --device cpu --num_workers 0 "
               "--batch_size 5 --shard_images 5").split()
IMAGES = len(CLASSES) * IMAGES_PER_CLASS


def cache_images(data, cache):
    """One main_cache.py run, in this process (a world of one)."""
    args = main_cache.get_args_parser().parse_args([*CACHE_FLAGS, "--data_path", str(data),
                                                    "--cached_path", str(cache)])
    main_cache.main(main_cache.resolve_settings(args))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data):
    """The folder cached by one uninterrupted run."""
    path = tmp_path_factory.mktemp("cache")
    cache_images(data, path)
    return path


def test_an_interrupted_caching_run_resumes_and_ends_complete(tmp_path, data, cache, monkeypatch, capsys):
    shard_records, atomic_write = [], latent_cache.atomic_write

    def interrupted_at_the_third_record(path, write, durable=True):
        if os.path.basename(os.path.dirname(path)) == SHARDS and path.endswith(".json"):
            shard_records.append(path)
            if len(shard_records) == 3:  # after the third shard's .npy, before its .json
                raise KeyboardInterrupt
        atomic_write(path, write, durable)

    resumed = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(latent_cache, "atomic_write", interrupted_at_the_third_record)
        with pytest.raises(KeyboardInterrupt):
            cache_images(data, resumed)
    assert not (resumed / INDEX).exists() and len(list((resumed / SHARDS).glob("*.npy"))) == 3
    assert len(complete_shards(str(resumed / SHARDS))) == 2
    capsys.readouterr()
    cache_images(data, resumed)
    log = capsys.readouterr().out
    assert "removed 1 unfinished file(s)" in log and f"14 of {IMAGES} images to cache" in log
    assert f"holds all {IMAGES} images" in log
    straight, again = open_latent_cache(str(cache), hflip=False), open_latent_cache(str(resumed), hflip=False)
    assert again.keys == straight.keys and len(again) == IMAGES
    assert all(torch.equal(again[i][0], straight[i][0]) and again[i][1] == straight[i][1] for i in range(IMAGES))
    assert sum(len(shard.images) for shard in complete_shards(str(resumed / SHARDS))) == IMAGES


def test_mrar_trains_one_epoch_from_the_cache(tmp_path, data, cache):
    index = tmp_path / "mrar.jsonl"
    build_mrar_index(str(data / "train"), str(index))
    out = tmp_path / "run"
    result = run([*TINY, "--mrar", "--patch_size", 2, "--use_cached", "--cached_path", cache, "--mrar_index", index,
                  "--output_dir", out, "--epochs", 1])
    assert f"training data: {IMAGES} examples in {len(CLASSES)} classes" in result.stdout + result.stderr
    assert load_state(out / "checkpoint-last.pth")["epoch"] == 0
