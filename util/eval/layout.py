"""How an evaluation is laid out on disk, in one place: its folder, its manifest, and image `index`'s file,
class and noise.

Image `index` of an `num_images`-image run is `{index:05d}.png` and belongs to class
`index // (num_images // class_num)` (the original's class-major order); its noise is its own Philox stream,
keyed by `--seed` and `index` together (`image_key`: 128 bits, nothing truncated), so it is the same image
whatever the world size, batch order or resumption, and another seed shares no stream with it.

An evaluation folder holds `manifest.json`: what was evaluated (the weights' digest, EMA or raw, the checkpoint it
came from) and every setting that changes the images. The folder name is the original's readable one plus a short
digest of that identity, so two models or two seeds never share a folder; a folder whose manifest names another
identity is refused rather than reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

from PIL import Image

from models.noise import PhiloxNoise
from models.samplers import DEFAULT_SAMPLER
from util.io import read_json, write_json

MANIFEST = "manifest.json"
NOISE = "philox(key=(seed mod 2**64) << 64 | index), numpy standard_normal float32"  # recorded with every evaluation


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: what is evaluated, every setting that changes its images, and what names it.

    The one owner of those values: they give the folder's name and digest (`folder`), the manifest's identity
    (`identity`), and the settings of the log line and of the `metrics.json` record (`record`).
    """

    weights_digest: str       # sha256 of the sampled weights' bytes (`util.execution.wrap.parameter_digest`)
    tokenizer_digest: str     # the same of the tokenizer's weights
    ema: bool                 # the EMA weights (else the raw ones)
    checkpoint: str           # the file the weights came from ('' for none)
    epoch: str                # the checkpoint's epoch label: a number, 'released' or 'scratch'
    seed: int                 # with the index, each image's noise key (`image_key`)
    model: str
    mrar: bool
    patch_size: int
    img_size: int
    class_num: int
    tokenizer: str
    vae_stride: int
    vae_embed_dim: int
    sampler: str
    num_sampling_steps: int
    cfg: Union[float, Sequence[float]]  # one value, or one per MRAR stage
    scale_0: float
    scale_1: float
    cfg_interval: Optional[Tuple[float, float]]
    num_images: int
    precision: str            # the resolved autocast precision: fp32, bf16 or fp16
    standalone: bool          # `--evaluate` (else an online evaluation while training); only names the folder

    def identity(self) -> dict:
        """Everything that determines the images: its digest names the folder, the manifest records it."""
        return {"weights_digest": self.weights_digest, "weights": "ema" if self.ema else "raw",
                "tokenizer_digest": self.tokenizer_digest, "seed": self.seed, "model": self.model, "mrar": self.mrar,
                "patch_size": self.patch_size, "img_size": self.img_size, "class_num": self.class_num,
                "tokenizer": self.tokenizer, "vae_stride": self.vae_stride, "vae_embed_dim": self.vae_embed_dim,
                "sampler": self.sampler, "num_sampling_steps": self.num_sampling_steps, "cfg": self.cfg,
                "scale_0": self.scale_0, "scale_1": self.scale_1, "cfg_interval": self.cfg_interval,
                "num_images": self.num_images, "precision": self.precision, "noise": NOISE}

    def record(self) -> dict:
        """The settings that move the scores, in the order of the log line and the `metrics.json` record."""
        return {"epoch": self.epoch, "checkpoint": self.checkpoint, "ema": self.ema,
                "weights_digest": self.weights_digest, "sampler": self.sampler,
                "num_sampling_steps": self.num_sampling_steps, "cfg": self.cfg, "cfg_interval": self.cfg_interval,
                "scale_0": self.scale_0, "scale_1": self.scale_1, "precision": self.precision, "seed": self.seed,
                "noise": NOISE, "num_images": self.num_images, "images_per_class": self.num_images // self.class_num}

    def folder(self, output_dir: str) -> str:
        """`<output_dir>/<the original's readable name>-<8 hex digits of the identity>[_ema][_evaluate]`; the
        readable part names the sampler when it is not the default."""
        cfg_name = ",".join(str(c) for c in self.cfg) if isinstance(self.cfg, (list, tuple)) else self.cfg
        readable = (f"epoch{self.epoch}-diffsteps{self.num_sampling_steps}-cfg{cfg_name}-image{self.num_images}-"
                    f"scale{self.scale_0}-{self.scale_1}")
        if self.sampler != DEFAULT_SAMPLER:
            readable += f"-{self.sampler}"
        name = folder_name(readable, self.identity()) + ("_ema" if self.ema else "")
        return os.path.join(output_dir, name + ("_evaluate" if self.standalone else ""))


def image_class(index: int, num_images: int, class_num: int) -> int:
    """Class of evaluation image `index` (class-major order, the same count per class)."""
    if num_images % class_num != 0:
        raise ValueError(f"num_images ({num_images}) must be a multiple of class_num ({class_num})")
    if not 0 <= index < num_images:
        raise IndexError(f"image index {index} outside [0, {num_images})")
    return index // (num_images // class_num)


def class_indices(label: int, num_images: int, class_num: int) -> range:
    """The indices of class `label`'s images, in order (the inverse of `image_class`)."""
    if num_images % class_num != 0:
        raise ValueError(f"num_images ({num_images}) must be a multiple of class_num ({class_num})")
    if not 0 <= label < class_num:
        raise IndexError(f"class {label} outside [0, {class_num})")
    per_class = num_images // class_num
    return range(label * per_class, (label + 1) * per_class)


def image_key(seed: int, index: int) -> int:
    """The 128-bit Philox key of evaluation image `index` under `--seed`: the seed (mod 2**64) in the high 64 bits,
    the index in the low 64, so that no two (seed, index) pairs share a key."""
    if not 0 <= index < 2**64:
        raise ValueError(f"image index {index} outside [0, 2**64)")
    return ((seed % 2**64) << 64) | index


def image_noise(seed: int, indices: Iterable[int]) -> PhiloxNoise:
    """The noise of evaluation images `indices` (`NOISE`): each image's own Philox stream (`image_key`)."""
    return PhiloxNoise(image_key(seed, index) for index in indices)


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
        manifest = read_json(path)
        if not isinstance(manifest, dict):
            raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest; move {folder} away or "
                             "choose another --output_dir")
        existing = manifest.get("identity", {})
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
