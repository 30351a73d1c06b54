"""Images in memory and on disk: uint8 conversion, grids, and the one reader of image folders.

Tensors here are uint8 ``[N, 3, H, W]`` (RGB) unless stated; model outputs are float ``[B, 3, H, W]`` in
[-1, 1] and become uint8 through `to_uint8`, the original's rounding.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from util.data.rgb import as_rgb
from util.eval.layout import class_indices, image_class, image_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MIN_GRID_CELL = 64  # px: grids show smaller images zoomed (nearest neighbour) to at least this side


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (round((x + 1) / 2 · 255), clipped), as the original."""
    pixels = ((images.float().cpu() + 1) / 2 * 255).clamp(0, 255).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, per_row: int, scale: int = 2) -> Image.Image:
    """uint8 images [N, 3, H, W] -> a PIL grid of `per_row` columns, upscaled `scale` times (nearest)."""
    grid = make_grid(images, nrow=per_row, padding=2, pad_value=128)  # [3, H', W']
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def grid_zoom(img_size: int, min_cell: int = MIN_GRID_CELL) -> int:
    """The whole-number zoom that shows an `img_size`-pixel image at least `min_cell` pixels wide (1: an image
    that large is shown as it is)."""
    return max(1, math.ceil(min_cell / img_size))


def zoomed_grid(images: torch.Tensor, per_row: int) -> Image.Image:
    """`image_grid` of uint8 images [N, 3, H, W], zoomed by `grid_zoom` of their smaller side: the one rule of
    every grid we write (evaluations, previews, the quickstart's samples)."""
    return image_grid(images, per_row, scale=grid_zoom(min(images.shape[-2:])))


def evaluation_grid(folder: str | os.PathLike, num_images: int, class_num: int, classes: Sequence[int],
                    per_class: int) -> Image.Image:
    """A `zoomed_grid` of an evaluation folder: one row per class of `classes`, its first `per_class` images (all
    of them when it has fewer). Reads those PNGs alone, not the folder."""
    per_class = min(per_class, num_images // class_num)
    paths = [Path(image_path(os.fspath(folder), index)) for label in classes
             for index in class_indices(label, num_images, class_num)[:per_class]]
    return zoomed_grid(_stack(paths, folder), per_class)  # rows of [per_class] images


def constant_images(pixels: np.ndarray) -> int:
    """How many of the uint8 images [B, H, W, 3] are one colour all over (what NaN latents decode to)."""
    return int((pixels == pixels[:, :1, :1]).all(axis=(1, 2, 3)).sum())  # each pixel against the first


def is_constant_png(path: str | os.PathLike) -> bool:
    """Whether the image file `path` is one colour all over."""
    with Image.open(path) as image:
        return all(low == high for low, high in image.convert("RGB").getextrema())


def list_pngs(image_dir: str | os.PathLike) -> list[Path]:
    """The ``*.png`` files directly inside ``image_dir`` (case-insensitive suffix), sorted by name."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    return sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def read_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image as uint8 ``[H, W, 3]``; ``size`` = (H, W) it must have. Errors name the file."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(as_rgb(image), dtype=np.uint8)  # [H, W, 3]
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    if size is not None and pixels.shape[:2] != tuple(size):
        raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} (WxH), expected {size[1]}x{size[0]} "
                         "like the other images")
    return pixels


def _stack(paths: list[Path], folder) -> torch.Tensor:
    """Read same-sized images into uint8 [N, 3, H, W]."""
    first = read_rgb(paths[0])
    arrays = [first] + [read_rgb(path, first.shape[:2]) for path in paths[1:]]  # [H, W, 3] each
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]


def read_image_folder(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder split in memory: (uint8 [N, 3, H, W], int64 labels [N]).

    Classes are the sorted subfolder names and labels their positions (torchvision's ImageFolder rule);
    files are read in sorted order. All images must share one size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"no class folders in {folder}")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    return _stack(paths, folder), torch.tensor(labels, dtype=torch.int64)


def read_generated_images(folder: str | os.PathLike, num_images: int,
                          class_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An evaluation folder's ``{index:05d}.png`` for ``index < num_images`` and their intended classes.

    Returns uint8 ``[num_images, 3, H, W]`` and int64 labels ``[num_images]`` (`util.eval.layout`).
    """
    folder = Path(folder)
    paths = [folder / f"{index:05d}.png" for index in range(num_images)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_images} samples missing in {folder}, e.g. {missing[0]}")
    labels = torch.tensor([image_class(i, num_images, class_num) for i in range(num_images)])
    return _stack(paths, folder), labels
