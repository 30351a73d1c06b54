"""How an evaluation is laid out on disk, in one place: its folder, its manifest, and image `index`'s file,
class and seed.

Image `index` of an `num_images`-image run is `{index:05d}.png` and belongs to class
`index // (num_images // class_num)` (the original's class-major order); its noise comes from seed
`(base_seed << 32) + index`, so it is the same image whatever the world size, batch order or resumption.

An evaluation folder holds `manifest.json`: what was evaluated (the weights' digest, EMA or raw, the checkpoint it
came from) and every setting that changes the images. The folder name is the original's readable one plus a short
digest of that identity, so two models or two seeds never share a folder; a folder whose manifest names another
identity is refused rather than reused.
"""
from __future__ import annotations

import hashlib
import json
import os

from PIL import Image

from util.io import write_json

MANIFEST = "manifest.json"


def image_class(index: int, num_images: int, class_num: int) -> int:
    """Class of evaluation image `index` (class-major order, the same count per class)."""
    if num_images % class_num != 0:
        raise ValueError(f"num_images ({num_images}) must be a multiple of class_num ({class_num})")
    if not 0 <= index < num_images:
        raise IndexError(f"image index {index} outside [0, {num_images})")
    return index // (num_images // class_num)


def image_seed(base_seed: int, index: int) -> int:
    """Per-image seed of evaluation image `index`."""
    return (base_seed << 32) + index


def image_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:05d}.png")


def identity_digest(identity: dict) -> str:
    """sha256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def folder_name(readable: str, identity: dict) -> str:
    """`<readable>-<8 hex digits of the identity>`; the readable part is the original's naming."""
    return f"{readable}-{identity_digest(identity)[:8]}"


def claim_folder(folder: str, identity: dict, record: dict) -> None:
    """Create `folder` with its manifest, or check that an existing one holds the same identity.

    Raises ValueError when the folder holds images of another identity (or images without a manifest), naming
    the settings that differ.
    """
    path = os.path.join(folder, MANIFEST)
    if os.path.isfile(path):
        with open(path) as handle:
            existing = json.load(handle).get("identity", {})
        if existing != json.loads(json.dumps(identity, default=str)):
            differing = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
            raise ValueError(f"{folder} holds images of another evaluation (differing: {', '.join(differing)}); "
                             "move it away or choose another --output_dir")
        return
    if os.path.isdir(folder) and any(name.endswith(".png") for name in os.listdir(folder)):
        raise ValueError(f"{folder} holds images but no {MANIFEST}, so what made them is unknown; move it away or "
                         "choose another --output_dir")
    write_json(path, {"identity": identity, **record})


def is_complete_png(path: str, size: int) -> bool:
    """True when `path` decodes fully as a `size` x `size` image (a truncated or foreign file is False)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size == (size, size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
