"""util.data.latent_cache: the sharded layout's writer and reader against the per-image one, and MRAR groups read
from either, on a tiny image folder encoded by the pixel tokenizer (a cache's moments are known exactly)."""
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

import main_cache
from models.tokenizers import PixelTokenizer
from tests.support.runs import CLASSES, IMAGES_PER_CLASS, write_image_folder
from tools.build_mrar_index import build_mrar_index
from util.data.crops import cache_transform
from util.data.datasets import (
    CACHE_CLASSES,
    CachedLatentFolder,
    ImageFolderWithChecks,
    UnreadableImage,
    image_key,
    load_rgb,
)
from util.data.latent_cache import (
    INDEX,
    SHARDS,
    CachedMRARDataset,
    FileCacheWriter,
    ShardedCacheWriter,
    ShardedLatentCache,
    complete_shards,
    open_latent_cache,
    write_shard,
)
from util.errors import RunError
from util.io import write_json

SIZE = 16
TOKENIZER = PixelTokenizer(2)  # moments [24, 8, 8]: 12 pixel channels and 12 zero log-variances
IMAGES = len(CLASSES) * IMAGES_PER_CLASS


def moments_of(path):
    """(moments, moments_flip) [2C, h, w] of an image, as main_cache.py encodes them."""
    image = cache_transform(SIZE)(load_rgb(path))[None]  # [1, 3, H, W]
    return TOKENIZER.encode(image).parameters[0], TOKENIZER.encode(image.flip(dims=[3])).parameters[0]


def fill(writer, samples, batch=5):
    """Hand `samples` to `writer` in batches, as `engine_transdiff.cache_latents` does."""
    for start in range(0, len(samples), batch):
        paths = [path for path, _ in samples[start:start + batch]]
        pairs = [moments_of(path) for path in paths]
        writer.add(paths, torch.stack([m for m, _ in pairs]), torch.stack([f for _, f in pairs]))  # [B, 2C, h, w]
    writer.close()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return str(write_image_folder(tmp_path_factory.mktemp("data")) / "train")


@pytest.fixture(scope="module")
def samples(image_root):
    return ImageFolderWithChecks(image_root).samples


def write_cache(writer_type, cached_path, image_root, samples, **kwargs):
    writer = writer_type(str(cached_path), image_root, **kwargs)
    write_json(os.path.join(cached_path, CACHE_CLASSES), list(CLASSES))
    fill(writer, samples)
    writer.finish(samples)
    return str(cached_path)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, image_root, samples):
    """The folder cached both ways: {"sharded": path, "files": path}, shards of 5 images."""
    root = tmp_path_factory.mktemp("caches")
    return {"sharded": write_cache(ShardedCacheWriter, root / "sharded", image_root, samples, shard_images=5),
            "files": write_cache(FileCacheWriter, root / "files", image_root, samples)}


# --- the two layouts --------------------------------------------------------------------------------

def test_each_layout_opens_as_its_reader(caches):
    assert isinstance(open_latent_cache(caches["sharded"]), ShardedLatentCache)
    assert isinstance(open_latent_cache(caches["files"]), CachedLatentFolder)


def test_both_layouts_give_every_item_bit_identical_and_as_the_tokenizer_encodes_it(caches, image_root, samples):
    sharded, files = open_latent_cache(caches["sharded"]), open_latent_cache(caches["files"])
    assert len(sharded) == len(files) == IMAGES and sharded.classes == files.classes == list(CLASSES)
    assert sharded.keys == files.keys == [image_key(image_root, path) for path, _ in samples]
    mirrors = set()
    for index, (path, label) in enumerate(samples):
        own, mirror = moments_of(path)
        for seed in range(6):  # the same draws from the same generator: the same choice of the two moments
            sharded.generator = torch.Generator().manual_seed(seed)
            files.generator = torch.Generator().manual_seed(seed)
            (a, label_a), (b, label_b) = sharded[index], files[index]
            assert a.dtype == b.dtype == torch.float32 and a.shape == (24, 8, 8)
            assert torch.equal(a, b) and label_a == label_b == label
            assert torch.equal(a, own) or torch.equal(a, mirror)
            mirrors.add(torch.equal(a, mirror))
    assert mirrors == {True, False}


def test_without_hflip_every_layout_gives_the_image_itself(caches, samples):
    for path in caches.values():
        dataset = open_latent_cache(path, hflip=False)
        for index in (0, 11, IMAGES - 1):
            assert torch.equal(dataset[index][0], moments_of(samples[index][0])[0])


def test_the_sharded_flip_draws_one_number_from_the_given_generator(caches, samples):
    dataset = open_latent_cache(caches["sharded"], generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    own, mirror = moments_of(samples[3][0])
    expected = [mirror if torch.rand((), generator=replay).item() >= 0.5 else own for _ in range(8)]
    assert all(torch.equal(dataset[3][0], moments) for moments in expected)


def test_shards_are_mapped_from_disk_and_a_pickled_dataset_carries_no_mapping(caches):
    dataset = ShardedLatentCache(caches["sharded"], hflip=False)
    first = dataset[0][0]
    assert isinstance(dataset.rows(0), np.memmap) and dataset.rows(0).shape[1:] == (2, 24, 8, 8)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._mapped == {} and torch.equal(copy[0][0], first)


def test_a_rank_writes_full_shards_and_the_index_follows_the_image_folder(caches):
    shards = complete_shards(os.path.join(caches["sharded"], SHARDS))
    assert sorted(len(shard.images) for shard in shards) == [4, 5, 5, 5, 5]
    index = json.loads(open(os.path.join(caches["sharded"], INDEX)).read())
    assert index["shape"] == [2, 24, 8, 8] and index["dtype"] == "<f4" and len(index["shards"]) == 5
    assert index["labels"] == [label for label in range(3) for _ in range(IMAGES_PER_CLASS)]


# --- resuming and gaps --------------------------------------------------------------------------------

def test_an_interrupted_run_leaves_no_partial_shard_that_counts_and_the_rerun_completes_it(
        tmp_path, image_root, samples):
    cache = str(tmp_path / "cache")
    folder = os.path.join(cache, SHARDS)
    done = ShardedCacheWriter(cache, image_root, shard_images=5)
    fill(done, samples[:10])  # two complete shards
    cut = write_shard(folder, [image_key(image_root, path) for path, _ in samples[10:15]],
                      np.zeros((5, 2, 24, 8, 8), np.float32))
    os.remove(os.path.join(folder, f"{cut}.json"))  # killed between the .npy and its .json
    open(os.path.join(folder, f".{cut}.json.x1y2.tmp"), "w").close()  # and a temporary file of a killed write
    resumed = ShardedCacheWriter(cache, image_root, shard_images=5)
    assert resumed.uncached(samples) == list(range(10, IMAGES))
    assert resumed.clean() == 2 and sorted(os.listdir(folder)) == sorted(
        f"{shard.name}.{ext}" for shard in complete_shards(folder) for ext in ("npy", "json"))
    with pytest.raises(RunError, match=f"^14 of {IMAGES} images of .* are in no complete shard .* e.g. bees/2.png"):
        resumed.finish(samples)
    assert not os.path.exists(os.path.join(cache, INDEX))  # an index means a complete cache
    fill(resumed, [samples[i] for i in resumed.uncached(samples)])
    resumed.finish(samples)
    write_json(os.path.join(cache, CACHE_CLASSES), list(CLASSES))
    dataset = open_latent_cache(cache, hflip=False)
    assert len(complete_shards(folder)) == 5 and len(dataset) == IMAGES
    assert all(torch.equal(dataset[i][0], moments_of(path)[0]) for i, (path, _) in enumerate(samples))


@pytest.mark.parametrize("writer_type, message", [
    (ShardedCacheWriter, "are in no complete shard"),
    (FileCacheWriter, "have no cache file"),
])
def test_a_gap_is_an_error_naming_an_image(tmp_path, image_root, samples, writer_type, message):
    writer = writer_type(str(tmp_path / "cache"), image_root)
    fill(writer, samples[1:])
    gap = f"^1 of {IMAGES} images of {re.escape(image_root)} {message} .*e.g. .*ants.0.png"
    with pytest.raises(RunError, match=gap):
        writer.finish(samples)


def test_shards_of_other_settings_are_not_mixed(tmp_path, image_root, samples):
    writer = ShardedCacheWriter(str(tmp_path / "cache"), image_root)
    fill(writer, samples[1:])
    write_shard(writer.folder, [image_key(image_root, samples[0][0])], np.zeros((1, 2, 24, 4, 4), np.float32))
    with pytest.raises(RunError, match="different shapes or dtypes .* use a new --cached_path"):
        writer.finish(samples)


# --- reading errors -------------------------------------------------------------------------------------

def test_a_cache_with_shards_but_no_index_is_called_unfinished(caches, tmp_path):
    (tmp_path / SHARDS).mkdir()
    with pytest.raises(FileNotFoundError, match="holds cache shards but no index.json: .* did not finish"):
        open_latent_cache(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (lambda index: index.pop("row"), "is not a latent cache index"),
    (lambda index: index["labels"].pop(), "lists differ in length"),
    (lambda index: index["shards"].__setitem__(0, "../elsewhere.npy"), "names shards that are not"),
    (lambda index: index["labels"].__setitem__(0, 3), "labels outside the 3 classes"),
])
def test_a_malformed_index_is_named(caches, tmp_path, change, message):
    cache = tmp_path / "cache"
    index = json.loads(open(os.path.join(caches["sharded"], INDEX)).read())
    change(index)
    write_json(cache / INDEX, index)
    write_json(cache / CACHE_CLASSES, list(CLASSES))
    with pytest.raises(ValueError, match=f"^{re.escape(str(cache / INDEX))}.*{message}"):
        ShardedLatentCache(str(cache))


def test_a_shard_that_disagrees_with_its_index_is_named(caches, tmp_path):
    cache = tmp_path / "cache"
    index = json.loads(open(os.path.join(caches["sharded"], INDEX)).read())
    write_json(cache / INDEX, index)
    write_json(cache / CACHE_CLASSES, list(CLASSES))
    (cache / SHARDS).mkdir()
    np.save(cache / SHARDS / index["shards"][0], np.zeros((5, 2, 24, 4, 4), np.float32))
    dataset = ShardedLatentCache(str(cache))
    first = index["shard"].index(0)
    with pytest.raises(UnreadableImage, match=f"cache shard .*{index['shards'][0]} holds rows \\[2, 24, 4, 4\\]"):
        dataset[first]
    with pytest.raises(UnreadableImage, match="cannot read cache shard"):
        dataset[index["shard"].index(1)]


# --- MRAR -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mrar_index(tmp_path_factory, image_root):
    path = str(tmp_path_factory.mktemp("mrar") / "index.jsonl")
    build_mrar_index(image_root, path, seed=0)
    return path


@pytest.mark.parametrize("layout", ["sharded", "files"])
def test_cached_mrar_items_are_the_moments_of_the_four_indexed_images(caches, image_root, mrar_index, layout):
    dataset = CachedMRARDataset(open_latent_cache(caches[layout], generator=torch.Generator().manual_seed(0)),
                                mrar_index)
    lines = [json.loads(line) for line in open(mrar_index)]
    assert len(dataset) == len(lines) == IMAGES and dataset.classes == list(CLASSES)
    mixed = False
    for item, line in zip(dataset, lines):
        *moments, label = item
        assert len(moments) == 4 and label == CLASSES.index(line["cate"])
        mirrored = []
        for got, name in zip(moments, line["files"]):
            own, mirror = moments_of(os.path.join(image_root, line["cate"], name))
            assert torch.equal(got, own) or torch.equal(got, mirror)
            mirrored.append(torch.equal(got, mirror))
        mixed |= len(set(mirrored)) == 2  # the four are drawn independently
    assert mixed


def test_cached_mrar_without_hflip_gives_the_images_themselves(caches, image_root, mrar_index):
    dataset = CachedMRARDataset(open_latent_cache(caches["sharded"], hflip=False), mrar_index)
    line = json.loads(open(mrar_index).readline())
    for got, name in zip(dataset[0][:4], line["files"]):
        assert torch.equal(got, moments_of(os.path.join(image_root, line["cate"], name))[0])


@pytest.mark.parametrize("line, message", [
    ({"cate": "dogs", "files": ["0.png"] * 4}, "class 'dogs' is not a class of the latent cache"),
    ({"cate": "ants", "files": ["0.png", "1.png", "gone.png", "3.png"]}, "ants/gone.png is not in the latent cache"),
    ({"cate": "ants", "files": ["0.png", "../bees/1.png", "2.png", "3.png"]}, "ants/../bees/1.png is not in"),
    ({"cate": "ants", "files": ["0.png", "1.png", "2.png"]}, "needs at least 4 files"),
])
def test_cached_mrar_bad_lines_are_clear_errors(caches, tmp_path, line, message):
    index = tmp_path / "mrar.jsonl"
    index.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(index))}:1: {message}"):
        CachedMRARDataset(open_latent_cache(caches["sharded"]), str(index))


def test_a_shard_of_no_images_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main_cache.cli(["--cached_path", str(tmp_path), "--shard_images", "0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "main_cache.py: error: --shard_images must be at least 1, got 0\n"
