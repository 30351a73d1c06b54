"""The latent caches that `main_cache.py` writes and `main.py --use_cached` reads: for each image of an image folder,
the tokenizer's posterior moments ([2C, h, w], mean and log-variance on channels) of its ADM centre crop and of that
crop's mirror. An image is named by its path relative to the image folder, ``/``-separated (`image_key`).

Sharded layout (`main_cache.py`'s default)::

    <cached_path>/classes.json       the image folder's class folders, in label order
    <cached_path>/shards/<id>.npy    [n, 2, 2C, h, w]: row i holds (moments, moments_flip) of the shard's image i
    <cached_path>/shards/<id>.json   {"images": [the n images of the rows, in row order]}
    <cached_path>/index.json         where each image of the folder is; written last

Each rank buffers its images and writes them as shards of `SHARD_IMAGES` (the last one fewer), each under a random
id, so no two writers ever share a file: the `.npy` first, then its `.json`, each atomically and durably
(`util.io.atomic_write`). A shard is complete when both files are there and agree on the number of rows. Before
any rank writes, rank 0 removes everything else from `shards/` (an `.npy` whose `.json` a kill prevented, temporary
files), and a run caches only the images that no complete shard holds: an interrupted run continues where it
stopped. After every rank has written, rank 0 checks that the complete shards hold every image of the folder (a
gap is an error) and only then writes `index.json`, so a cache with an index is complete. The index (compact JSON)
holds "shape" and "dtype" of one row, "shards" (file names), and per image, in the image folder's order, "images",
"labels", "shard" (a position in "shards") and "row". Readers map the shards with ``np.load(mmap_mode="r")``.

The per-image layout (`main_cache.py --cache_format files`, and every cache written before the sharded one),
``<cached_path>/<class>/<image file name>.npz``, is `CachedLatentFolder`'s. `open_latent_cache` reads either, by
whether ``index.json`` is there; both give the same items for the same images, and `CachedMRARDataset` reads MRAR
groups from either.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from util.data.datasets import (
    CACHE_CLASSES,
    CachedLatentFolder,
    UnreadableImage,
    cached_latent_path,
    draw_mirror,
    image_key,
    read_mrar_index,
    recorded_classes,
    write_cached_latent,
)
from util.errors import RunError
from util.io import atomic_write, read_json, remove_stale_temp_files

INDEX = "index.json"
SHARDS = "shards"
SHARD_IMAGES = 4096  # images per shard: 256 MiB of KL-16 moments at 256 px, held by a rank until written
INDEX_FIELDS = ("shape", "dtype", "shards", "images", "labels", "shard", "row")
PER_IMAGE_FIELDS = ("images", "labels", "shard", "row")


# ---------------------------------------------------------------------------------------------- shards
class Shard(NamedTuple):
    """A complete shard: its id, its images in row order, and the shape and dtype of one row."""

    name: str
    images: list[str]
    row_shape: tuple[int, ...]
    dtype: str


def write_shard(folder: str, images: list[str], rows: np.ndarray) -> str:
    """Write one complete shard of ``rows`` [n, 2, 2C, h, w] holding ``images`` under a new id; returns the id."""
    name = uuid.uuid4().hex
    atomic_write(os.path.join(folder, f"{name}.npy"), lambda handle: np.save(handle, rows))
    payload = json.dumps({"images": images}).encode()
    atomic_write(os.path.join(folder, f"{name}.json"), lambda handle: handle.write(payload))
    return name


def read_shard(folder: str, name: str) -> Shard | None:
    """The shard ``name`` of ``folder`` if it is complete (an ``.npy`` and a ``.json`` naming one image per row),
    else None."""
    try:
        images = read_json(os.path.join(folder, f"{name}.json"))["images"]
        rows = np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")  # [n, 2, 2C, h, w]; reads the header
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    if not isinstance(images, list) or len(images) != len(rows) or not all(isinstance(key, str) for key in images):
        return None
    return Shard(name, images, tuple(rows.shape[1:]), rows.dtype.str)


def complete_shards(folder: str) -> list[Shard]:
    """The complete shards of ``folder``, by id."""
    if not os.path.isdir(folder):
        return []
    names = sorted(file[:-len(".json")] for file in os.listdir(folder)
                   if file.endswith(".json") and not file.startswith("."))
    return [shard for shard in (read_shard(folder, name) for name in names) if shard is not None]


def shard_positions(shards: Sequence[Shard]) -> dict[str, tuple[int, int]]:
    """Image -> (shard number, row); an image held twice is read from the first shard that holds it."""
    positions: dict[str, tuple[int, int]] = {}
    for number, shard in enumerate(shards):
        for row, key in enumerate(shard.images):
            positions.setdefault(key, (number, row))
    return positions


class ShardedCacheWriter:
    """`main_cache.py`'s side of the sharded layout, for one rank: `clean` and `uncached` (rank 0, before any
    rank writes), `add` and `close` (every rank), `finish` (rank 0, after every rank has closed)."""

    def __init__(self, cached_path: str, image_root: str, shard_images: int = SHARD_IMAGES):
        self.cached_path = cached_path
        self.folder = os.path.join(cached_path, SHARDS)
        self.image_root = image_root
        self.shard_images = shard_images
        self.images: list[str] = []
        self.rows: list[np.ndarray] = []  # [2, 2C, h, w] each

    def clean(self) -> int:
        """Remove from ``shards/`` every file that is not part of a complete shard; returns how many went."""
        if not os.path.isdir(self.folder):
            return 0
        complete = {shard.name for shard in complete_shards(self.folder)}
        leftovers = [file for file in os.listdir(self.folder) if os.path.splitext(file)[0] not in complete]
        for file in leftovers:
            os.remove(os.path.join(self.folder, file))
        return len(leftovers)

    def uncached(self, samples: Sequence[tuple[str, int]]) -> list[int]:
        """Indices of the (path, label) samples that no complete shard holds."""
        held = shard_positions(complete_shards(self.folder))
        return [i for i, (path, _) in enumerate(samples) if image_key(self.image_root, path) not in held]

    def add(self, paths: Sequence[str], moments: torch.Tensor, moments_flip: torch.Tensor) -> None:
        """Buffer a batch: ``moments`` and ``moments_flip`` [B, 2C, h, w] of the images at ``paths``; every
        `shard_images` buffered images are written as a shard."""
        pairs = torch.stack([moments, moments_flip], dim=1).cpu().numpy()  # [B, 2, 2C, h, w]
        self.images += [image_key(self.image_root, path) for path in paths]
        self.rows += list(pairs)
        while len(self.images) >= self.shard_images:
            self._write(self.shard_images)

    def close(self) -> None:
        """Write the buffered images as the rank's last shard."""
        if self.images:
            self._write(len(self.images))

    def _write(self, count: int) -> None:
        write_shard(self.folder, self.images[:count], np.stack(self.rows[:count]))  # [count, 2, 2C, h, w]
        del self.images[:count], self.rows[:count]

    def finish(self, samples: Sequence[tuple[str, int]]) -> None:
        """Write ``index.json`` for the image folder's (path, label) ``samples``; raises RunError if a complete
        shard holds none of them or the shards' rows differ in shape or dtype."""
        shards = complete_shards(self.folder)
        positions = shard_positions(shards)
        images = [image_key(self.image_root, path) for path, _ in samples]
        missing = [key for key in images if key not in positions]
        if missing:
            raise RunError(f"{len(missing)} of {len(images)} images of {self.image_root} are in no complete shard of "
                           f"{self.folder}, e.g. {missing[0]}; rerun main_cache.py")
        formats = sorted({(shard.row_shape, shard.dtype) for shard in shards})
        if len(formats) > 1:
            raise RunError(f"the shards of {self.folder} hold rows of different shapes or dtypes ({formats[0]}, "
                           f"{formats[1]}): written with other tokenizer or image settings; use a new --cached_path")
        (row_shape, dtype), = formats
        index = {"shape": list(row_shape), "dtype": dtype, "shards": [f"{shard.name}.npy" for shard in shards],
                 "images": images, "labels": [label for _, label in samples],
                 "shard": [positions[key][0] for key in images], "row": [positions[key][1] for key in images]}
        payload = json.dumps(index, separators=(",", ":")).encode()
        atomic_write(os.path.join(self.cached_path, INDEX), lambda handle: handle.write(payload))


class FileCacheWriter:
    """`main_cache.py`'s side of the per-image layout, with `ShardedCacheWriter`'s methods: one ``.npz`` per image,
    written at once (`write_cached_latent`); `finish` only checks that every image has one."""

    def __init__(self, cached_path: str, image_root: str):
        self.cached_path = cached_path
        self.image_root = image_root

    def clean(self) -> int:
        """Remove the temporary files of interrupted writes; returns how many went."""
        return sum(remove_stale_temp_files(folder)[0] for folder, _, _ in os.walk(self.cached_path))

    def uncached(self, samples: Sequence[tuple[str, int]]) -> list[int]:
        """Indices of the (path, label) samples without a cache file."""
        return [i for i, (path, _) in enumerate(samples)
                if not os.path.exists(cached_latent_path(self.cached_path, self.image_root, path))]

    def add(self, paths: Sequence[str], moments: torch.Tensor, moments_flip: torch.Tensor) -> None:
        """Write the cache files of a batch: ``moments`` and ``moments_flip`` [B, 2C, h, w] of the images at
        ``paths``."""
        for path, image_moments, flip_moments in zip(paths, moments.cpu(), moments_flip.cpu()):
            write_cached_latent(cached_latent_path(self.cached_path, self.image_root, path), image_moments,
                                flip_moments)

    def close(self) -> None:
        """Nothing is buffered: `add` has written every file."""

    def finish(self, samples: Sequence[tuple[str, int]]) -> None:
        """Raise RunError if an image of the (path, label) ``samples`` has no cache file."""
        missing = self.uncached(samples)
        if missing:
            raise RunError(f"{len(missing)} of {len(samples)} images of {self.image_root} have no cache file in "
                           f"{self.cached_path}, e.g. {samples[missing[0]][0]}; rerun main_cache.py")


CACHE_FORMATS = ("sharded", "files")


# ---------------------------------------------------------------------------------------------- reading
def read_index(path: str, class_count: int) -> dict:
    """The fields of a sharded cache's ``index.json``, checked; a malformed one raises ValueError naming it."""
    index = read_json(path)
    if not isinstance(index, dict) or any(field not in index for field in INDEX_FIELDS):
        raise ValueError(f"{path} is not a latent cache index (it needs {', '.join(INDEX_FIELDS)}); rerun "
                         "main_cache.py")
    if len({len(index[field]) for field in PER_IMAGE_FIELDS}) != 1:
        raise ValueError(f"{path}: its {', '.join(PER_IMAGE_FIELDS)} lists differ in length; rerun main_cache.py")
    outside = [name for name in index["shards"] if os.path.basename(name) != name or not name.endswith(".npy")]
    if outside:
        raise ValueError(f"{path} names shards that are not .npy files of {SHARDS}/: {outside[:5]}")
    if index["labels"] and not 0 <= min(index["labels"]) <= max(index["labels"]) < class_count:
        raise ValueError(f"{path} holds labels outside the {class_count} classes of {CACHE_CLASSES}; rerun "
                         "main_cache.py")
    return index


class ShardedLatentCache(Dataset):
    """A sharded latent cache (see the module docstring): ``(moments [2C, h, w], label)``, in the image folder's
    order, `CachedLatentFolder`'s items for the same images.

    Each item is the moments of the image or (unless ``hflip=False``) of its mirror, 50/50, drawn from
    ``generator`` or, when it is None, from torch's global RNG (`draw_mirror`). ``classes`` come from
    ``classes.json``. Each process maps the shards it reads itself (a pickled dataset carries no mapping).
    """

    def __init__(self, root: str, generator: torch.Generator | None = None, hflip: bool = True):
        self.root = root
        self.generator = generator
        self.hflip = hflip
        self.classes = recorded_classes(os.path.join(root, CACHE_CLASSES))
        index = read_index(os.path.join(root, INDEX), len(self.classes))
        self.keys: list[str] = index["images"]
        self.labels = np.asarray(index["labels"], dtype=np.int64)  # [N]
        self.shard_of = np.asarray(index["shard"], dtype=np.int64)  # [N]
        self.row_of = np.asarray(index["row"], dtype=np.int64)  # [N]
        self.shard_files: list[str] = index["shards"]
        self.row_shape = tuple(index["shape"])
        self.dtype = np.dtype(index["dtype"])
        self._mapped: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mapped": {}}

    def rows(self, number: int) -> np.ndarray:
        """Shard ``number`` mapped read-only, [n, 2, 2C, h, w]; an unreadable or mismatched shard raises
        UnreadableImage naming it."""
        if number not in self._mapped:
            path = os.path.join(self.root, SHARDS, self.shard_files[number])
            try:
                rows = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as error:
                raise UnreadableImage(f"cannot read cache shard {path}: {error}; rerun main_cache.py") from error
            if rows.shape[1:] != self.row_shape or rows.dtype != self.dtype:
                raise UnreadableImage(f"cache shard {path} holds rows {list(rows.shape[1:])} {rows.dtype}, its index "
                                      f"says {list(self.row_shape)} {self.dtype}; rerun main_cache.py")
            self._mapped[number] = rows
        return self._mapped[number]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pair = self.rows(int(self.shard_of[index]))[self.row_of[index]]  # [2, 2C, h, w], mapped
        moments = np.array(pair[1 if draw_mirror(self.generator, self.hflip) else 0])  # [2C, h, w], read
        return torch.from_numpy(moments), int(self.labels[index])


def open_latent_cache(root: str, generator: torch.Generator | None = None,
                      hflip: bool = True) -> ShardedLatentCache | CachedLatentFolder:
    """The latent cache in ``root``: sharded when it has ``index.json``, else per-image ``.npz`` files."""
    if os.path.isfile(os.path.join(root, INDEX)):
        return ShardedLatentCache(root, generator=generator, hflip=hflip)
    if os.path.isdir(os.path.join(root, SHARDS)):
        raise FileNotFoundError(f"{root} holds cache shards but no {INDEX}: its main_cache.py run did not finish; "
                                "rerun it")
    return CachedLatentFolder(root, generator=generator, hflip=hflip)


# ---------------------------------------------------------------------------------------------- MRAR
class CachedMRARDataset(Dataset):
    """MRAR groups read from a latent cache: ``(moments0, moments1, moments2, moments3, label)``, [2C, h, w] each.

    The groups are `MRARDataset`'s (`read_mrar_index`): image ``<cate>/<file>`` is the cache's item of that name,
    so each of the four takes its own or its mirror's moments, 50/50 and independently of the others, as each
    image of `MRARDataset` is flipped independently. The cache holds centre crops: no random crop. The label is
    ``cate``'s index among the cache's classes (the image folder's, as `MRARDataset` has them).
    """

    def __init__(self, latents: ShardedLatentCache | CachedLatentFolder, index_file: str):
        self.latents = latents
        self.classes = latents.classes
        self._labels = {name: label for label, name in enumerate(self.classes)}
        self._positions = {key: position for position, key in enumerate(latents.keys)}
        self.groups = [self._check(*entry) for entry in read_mrar_index(index_file)]

    def _check(self, where: str, cate: str, group: tuple[str, ...]) -> tuple[tuple[int, ...], int]:
        """One index line's group checked against the cache: (the items of its images, its label)."""
        if cate not in self._labels:
            raise ValueError(f"{where}: class {cate!r} is not a class of the latent cache {self.latents.root}")
        missing = [name for name in group if f"{cate}/{name}" not in self._positions]
        if missing:
            raise ValueError(f"{where}: {cate}/{missing[0]} is not in the latent cache {self.latents.root}; cache "
                             "the image folder the index was built from (main_cache.py)")
        return tuple(self._positions[f"{cate}/{name}"] for name in group), self._labels[cate]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> tuple:
        positions, label = self.groups[index]
        return (*(self.latents[position][0] for position in positions), label)
