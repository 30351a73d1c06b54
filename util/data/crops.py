"""Image crops and the two image transforms of the training pipeline.

* :func:`train_transform` - training on images (``main.py`` without ``--use_cached``, and every MRAR
  image): random square crop of side min(H, W) resized to ``img_size``, random horizontal flip.
  This is what the original code does; its README's "center crop + flip" describes the cached path.
* :func:`cache_transform` - ``main_cache.py``: ADM center crop, no flip (the cache stores the moments
  of the image and of its mirror, and training picks one of the two at random).

Both end in ToTensor + Normalize(0.5, 0.5), i.e. pixels in [-1, 1], the VAE's input range.
Randomness comes from torch's RNG, which DataLoader seeds per worker.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms

NORMALIZE = transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])  # [0, 1] -> [-1, 1]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM/MAR center crop to ``image_size`` x ``image_size``.

    Halves the image with a BOX filter while its short side is at least twice ``image_size``, resizes
    it with BICUBIC so the short side equals ``image_size``, then takes the central square.
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    left = (pil_image.width - image_size) // 2
    top = (pil_image.height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


class CenterCropArr:
    """Picklable transform wrapping :func:`center_crop_arr` (DataLoader workers may be spawned)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, pil_image: Image.Image) -> Image.Image:
        return center_crop_arr(pil_image, self.image_size)


class RandomSquareCrop:
    """The original's ``rand_crop_arr``: a random square of side min(H, W), resized to ``image_size``.

    The resize uses BICUBIC, which is PIL's default for RGB images that the original relied on.
    The crop offset is drawn from torch's RNG (the original used Python's unseeded ``random``).
    """

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, pil_image: Image.Image) -> Image.Image:
        side = min(pil_image.size)
        left = int(torch.randint(0, pil_image.width - side + 1, ()).item())
        top = int(torch.randint(0, pil_image.height - side + 1, ()).item())
        square = pil_image.crop((left, top, left + side, top + side))
        return square.resize((self.image_size, self.image_size), resample=Image.BICUBIC)


def train_transform(img_size: int, hflip: bool = True) -> transforms.Compose:
    """Training augmentation on images: random square crop, random h-flip (unless `hflip=False`, e.g. for
    digits, where a mirrored 3 is not a 3), tensor in [-1, 1] [3, H, W]."""
    flip = [transforms.RandomHorizontalFlip()] if hflip else []
    return transforms.Compose([RandomSquareCrop(img_size), *flip, transforms.ToTensor(), NORMALIZE])


def cache_transform(img_size: int) -> transforms.Compose:
    """Latent caching (``main_cache.py``): ADM center crop, no flip, tensor in [-1, 1] [3, H, W]."""
    return transforms.Compose([CenterCropArr(img_size), transforms.ToTensor(), NORMALIZE])
