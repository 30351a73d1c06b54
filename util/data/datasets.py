"""Training datasets: images, cached VAE moments, and MRAR groups of four same-class images.

Class indices always come from the dataset's own class folders (sorted names, hidden folders such
as ``.ipynb_checkpoints`` ignored) via :func:`find_class_folders`, never from a hard-coded ImageNet
table; for ImageNet's ``train/`` this is the standard sorted-synset order.

Layouts::

    <data_path>/train/<class>/<image>                  ImageFolderWithChecks, MRARDataset
    <cached_path>/<class>/<image file name>.npz        CachedLatentFolder ('moments', 'moments_flip'): the
                                                       per-image cache (`main_cache.py --cache_format files`)

The sharded latent cache, and MRAR groups read from either cache, are `util.data.latent_cache`'s.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import DatasetFolder, ImageFolder

from util.data.rgb import as_rgb
from util.errors import RunError
from util.io import atomic_write, read_json

CACHE_CLASSES = "classes.json"  # the image folder's class list, written by main_cache.py
MOMENTS_KEY = "moments"  # [2C, h, w]: posterior mean and log-variance of the center-cropped image
MOMENTS_FLIP_KEY = "moments_flip"  # the same for its horizontal mirror
MRAR_GROUP_SIZE = 4  # images per MRAR example: three references and the final target



class UnreadableImage(RunError):
    """A training file (image or cache file) cannot be read; the message names it."""

def find_class_folders(root: str) -> tuple[list[str], dict[str, int]]:
    """Sorted non-hidden sub-folder names of ``root`` and their indices."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root} (expected {root}/<class>/<file>)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected {root}/<class>/<file>)")
    return classes, {name: index for index, name in enumerate(classes)}


def class_samples(directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every file with one of ``extensions`` under each class folder, in torchvision's
    order (classes, folders and files sorted). A class folder may itself be a link; inside it, a link to a folder is
    followed only into the class folder's own tree and only once: a link out of it, or in a loop, is skipped with a
    warning (followed, it would give files twice or under another class)."""
    samples, skipped = [], []
    for name in sorted(class_to_idx):
        top = os.path.join(directory, name)
        if not os.path.isdir(top):
            continue
        inside = os.path.realpath(top)
        seen, walked = {inside}, []
        for folder, subfolders, files in os.walk(top, followlinks=True):
            kept = []
            for sub in subfolders:
                real = os.path.realpath(os.path.join(folder, sub))
                if real in seen or os.path.commonpath([inside, real]) != inside:
                    skipped.append(os.path.join(folder, sub))
                    continue
                seen.add(real)
                kept.append(sub)
            subfolders[:] = kept  # os.walk descends into these only
            walked.append((folder, files))
        for folder, files in sorted(walked):
            samples += [(os.path.join(folder, file), class_to_idx[name]) for file in sorted(files)
                        if file.lower().endswith(extensions)]
    if skipped:
        warnings.warn(f"{len(skipped)} linked folder(s) not followed (a loop, or outside their class folder): "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", stacklevel=3)
    return samples


def _check_samples(dataset: DatasetFolder, root: str, kind: str) -> None:
    """Raise if there are no samples at all; warn about classes without any."""
    if not dataset.samples:
        raise FileNotFoundError(f"no {kind} files found in the class folders of {root}")
    counts = np.bincount([target for _, target in dataset.samples], minlength=len(dataset.classes))
    empty = [name for name, count in zip(dataset.classes, counts, strict=True) if count == 0]
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) in {root} hold no {kind} files and keep their index "
                      f"without samples: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}",
                      stacklevel=3)


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB, its range kept (`as_rgb`); an unreadable file raises UnreadableImage naming it."""
    try:
        with Image.open(path) as image:
            return as_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"cannot read image {path}: {error} (--skip_corrupt skips unreadable images with a "
                              "warning)") from error


class ImageFolderWithChecks(ImageFolder):
    """``ImageFolder`` over ``<data_path>/train`` with clear errors.

    Missing or empty folders raise FileNotFoundError; empty class folders only warn (they keep
    their index). A corrupt image raises UnreadableImage naming the file, which keeps runs
    reproducible; with ``skip_corrupt=True`` it is replaced by the next readable sample (with a
    warning), so the dataset length, and hence every rank's shard, stays the same.
    """

    def __init__(self, root: str, transform: Callable | None = None, skip_corrupt: bool = False):
        self.skip_corrupt = skip_corrupt
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=True)
        _check_samples(self, root, "image")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return find_class_folders(directory)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return class_samples(directory, class_to_idx, extensions)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except UnreadableImage as error:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping corrupt image: {error}", stacklevel=2)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise UnreadableImage(f"no readable image in {self.root}")


def image_key(image_root: str, image_path: str) -> str:
    """An image's name in a latent cache (either layout): its path relative to ``image_root``, ``/``-separated,
    e.g. ``n01440764/x.JPEG``."""
    relative = os.path.relpath(os.path.abspath(image_path), os.path.abspath(image_root))
    if relative.startswith(os.pardir):
        raise ValueError(f"image {image_path} is not inside the image folder {image_root}")
    return relative.replace(os.sep, "/")


def cached_latent_path(cached_root: str, image_root: str, image_path: str) -> str:
    """Cache file of an image in the per-image layout: ``<cached_root>/<path relative to image_root>.npz``.

    ``train/n01440764/x.JPEG`` with ``image_root=train`` maps to ``<cached_root>/n01440764/x.JPEG.npz``,
    the original's naming. Used by the cache writer; :class:`CachedLatentFolder` reads that layout.
    """
    return os.path.join(cached_root, *image_key(image_root, image_path).split("/")) + ".npz"


def write_cached_latent(path: str, moments: torch.Tensor | np.ndarray,
                        moments_flip: torch.Tensor | np.ndarray) -> None:
    """Write one cache file atomically (see :func:`util.io.atomic_write`).

    Ranks may write the same file twice near the end of a shard, and an interrupted run must not
    leave a truncated file behind. ``moments`` and ``moments_flip`` are [2C, h, w]: the posterior
    mean and log-variance concatenated on channels.
    """
    arrays = {MOMENTS_KEY: moments, MOMENTS_FLIP_KEY: moments_flip}
    arrays = {key: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
              for key, value in arrays.items()}
    atomic_write(path, lambda handle: np.savez(handle, **arrays), durable=False)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {key: data[key] for key in (MOMENTS_KEY, MOMENTS_FLIP_KEY)}
    except KeyError as error:
        raise UnreadableImage(f"cache file {path} lacks {error}; expected keys "
                           f"{MOMENTS_KEY!r} and {MOMENTS_FLIP_KEY!r}") from error
    except (OSError, ValueError, EOFError) as error:
        raise UnreadableImage(f"cannot read cache file {path}: it is truncated, foreign bytes or holds pickled "
                              "objects (never loaded); delete it and rerun main_cache.py") from error


def recorded_classes(path: str) -> list[str]:
    """The class list `main_cache.py` recorded: folder names, each one path component inside the cache (a name
    such as ``../other`` would read another folder). A malformed file raises ValueError naming it."""
    classes = read_json(path)
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise ValueError(f"{path} must hold a JSON list of class folder names")
    outside = [name for name in classes if name in ("", ".", "..") or os.path.basename(name) != name
               or (os.altsep and os.altsep in name)]
    if outside:
        raise ValueError(f"{path} names folders that are not class folders of the cache: {outside[:5]}")
    return classes


def draw_mirror(generator: torch.Generator | None, hflip: bool) -> bool:
    """Whether a cached item takes the moments of its image's mirror: 50/50, drawn from ``generator`` (None:
    torch's global RNG), and never (nothing drawn) with ``hflip=False``."""
    return hflip and torch.rand((), generator=generator).item() >= 0.5


class CachedLatentFolder(DatasetFolder):
    """Cached VAE moments written by ``main_cache.py``: ``(moments [2C, h, w], label)``.

    Each item is the moments of the image or (unless ``hflip=False``) of its mirror, 50/50, drawn from
    ``generator`` or, when
    it is None, from torch's global RNG (which DataLoader seeds per worker; one generator object
    shared by all workers would repeat the same draws in each). ``classes`` fixes the class list; by default
    it is the image folder's, as `main_cache.py` recorded it in ``<root>/classes.json``, so a class without
    cache files keeps its label instead of shifting every later one (its absence is warned about), and a
    cache without that record uses its own sorted class folders.
    """

    def __init__(self, root: str, classes: Sequence[str] | None = None,
                 generator: torch.Generator | None = None, hflip: bool = True):
        if classes is None and os.path.isfile(os.path.join(root, CACHE_CLASSES)):
            classes = recorded_classes(os.path.join(root, CACHE_CLASSES))
        self._fixed_classes = list(classes) if classes is not None else None
        self.generator = generator
        self.hflip = hflip
        super().__init__(root, loader=_load_npz, extensions=(".npz",), allow_empty=True)
        _check_samples(self, root, ".npz")

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return class_samples(directory, class_to_idx, extensions)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._fixed_classes is None:
            return find_class_folders(directory)
        return self._fixed_classes, {name: index for index, name in enumerate(self._fixed_classes)}

    @property
    def keys(self) -> list[str]:
        """Each sample's image, as its path relative to the image folder (``/``-separated): its cache file's path
        relative to the cache, less ``.npz``."""
        return [os.path.relpath(path, self.root)[:-len(".npz")].replace(os.sep, "/") for path, _ in self.samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        data = self.loader(path)
        moments = data[MOMENTS_FLIP_KEY] if draw_mirror(self.generator, self.hflip) else data[MOMENTS_KEY]
        return torch.from_numpy(moments), target


def read_mrar_index(index_file: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """The groups of an MRAR index (JSON lines ``{"cate": ..., "files": [f0, f1, f2, f3, ...]}``):
    ``(where, cate, (f0, f1, f2, f3))`` per non-blank line, ``where`` being ``<file>:<line>`` for messages. A
    missing file, a malformed line or a group of fewer than four file names raises, naming the line."""
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"MRAR index file not found: {index_file} (build one with tools/build_mrar_index.py)")
    groups = []
    with open(index_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{index_file}:{line_number}"
            try:
                entry = json.loads(line)
                cate, files = entry["cate"], entry["files"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{where}: expected {{\"cate\": ..., \"files\": [...]}}, got "
                                 f"{line.strip()[:200]!r}") from error
            if not isinstance(files, list) or len(files) < MRAR_GROUP_SIZE:
                raise ValueError(f"{where}: needs at least {MRAR_GROUP_SIZE} files, got {files!r}")
            if not all(isinstance(name, str) for name in files[:MRAR_GROUP_SIZE]):
                raise ValueError(f"{where}: file names must be strings, got {files[:MRAR_GROUP_SIZE]!r}")
            groups.append((where, cate, tuple(files[:MRAR_GROUP_SIZE])))
    if not groups:
        raise ValueError(f"MRAR index file {index_file} has no entries")
    return groups


class MRARDataset(Dataset):
    """MRAR training groups: ``(img0, img1, img2, img3, label)`` of one class.

    ``index_file`` holds JSON lines ``{"cate": "<class folder>", "files": [f0, f1, f2, f3, ...]}``
    (the format of the original's ``Imagenet2012_mrar_files.txt``); only ``files[0..3]`` are used,
    read from ``<image_root>/<cate>/<file>``: f0..f2 are the references, f3 the final target. Each
    image is transformed independently. The label is ``cate``'s index among the sorted class folders
    of ``image_root``. The dataset length is the number of lines.
    """

    def __init__(self, image_root: str, index_file: str, transform: Callable | None = None):
        self.image_root = image_root
        self.index_file = index_file
        self.transform = transform
        self.classes, self.class_to_idx = find_class_folders(image_root)
        self._class_files: dict[str, set[str]] = {}
        self.groups = [self._check(*entry) for entry in read_mrar_index(index_file)]

    def _check(self, where: str, cate: str, group: tuple[str, ...]) -> tuple[str, tuple[str, ...], int]:
        """One index line's group checked against the class folders: ``(cate, files, label)``."""
        if cate not in self.class_to_idx:
            raise ValueError(f"{where}: class {cate!r} is not a class folder of {self.image_root}")
        if cate not in self._class_files:  # one listing per class: no stat() per file on a network filesystem
            self._class_files[cate] = set(os.listdir(os.path.join(self.image_root, cate)))
        for name in group:
            if name not in self._class_files[cate]:
                raise ValueError(f"{where}: {name!r} is not a file of the class folder "
                                 f"{os.path.join(self.image_root, cate)} (a group holds images of its own class)")
        return cate, group, self.class_to_idx[cate]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        cate, files, label = self.groups[index]
        images = []
        for name in files:
            image = load_rgb(os.path.join(self.image_root, cate, name))
            images.append(self.transform(image) if self.transform is not None else image)
        return (*images, label)
