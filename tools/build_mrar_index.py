"""Build an MRAR index file: JSON lines ``{"cate": <class folder>, "files": [f0, f1, f2, f3]}``.

Each line is one MRAR training example of four same-class images from an ImageFolder (``train/``):
f0..f2 are the references and f3 the final target, the format ``util.data.datasets.MRARDataset`` reads
(and the original's ``Imagenet2012_mrar_files.txt`` uses).

How the authors chose the groups is not published. Our assumption: every image is the target (f3) of
exactly one line, so an MRAR epoch sees each image once as a target, and its three references are

* ``random``: three other distinct images of its class, drawn uniformly;
* ``nearest``: its three nearest same-class neighbours (Euclidean) in a feature space, ordered from
  the third nearest to the nearest, so the reference right before the target is the most similar.
  Features are given per image (e.g. VAE latent means) or, by default, 8x8 center-cropped pixels.

Output is deterministic for a seed; classes with fewer than four images are skipped with a warning.

    python tools/build_mrar_index.py --data_path ROOT --out index.jsonl [--mode nearest] [--seed 0]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.data.crops import center_crop_arr
from util.data.datasets import MRAR_GROUP_SIZE, find_class_folders, load_rgb
from util.errors import run_cli
from util.io import atomic_write

MODES = ("random", "nearest")
Features = Mapping[str, Any] | Callable[[str], Any]  # vectors: arrays, tensors or lists


def list_class_images(image_root: str) -> dict[str, list[str]]:
    """Image files of each class folder, as sorted paths relative to that folder (``/``-separated)."""
    classes, _ = find_class_folders(image_root)
    listing = {}
    for cate in classes:
        class_dir = os.path.join(image_root, cate)
        files = []
        for directory, _, names in os.walk(class_dir, followlinks=True):
            for name in names:
                if name.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(directory, name), class_dir).replace(os.sep, "/"))
        listing[cate] = sorted(files)
    return listing


def pixel_features(path: str, size: int = 8) -> np.ndarray:
    """Default feature: the ``size`` x ``size`` ADM center crop of the image, flattened, in [0, 1]."""
    return np.asarray(center_crop_arr(load_rgb(path), size), dtype=np.float64).reshape(-1) / 255.0


def _random_references(count: int, rng: np.random.Generator) -> list[list[int]]:
    """For each target index, three other distinct indices drawn uniformly."""
    groups = []
    for target in range(count):
        others = rng.choice(count - 1, size=MRAR_GROUP_SIZE - 1, replace=False)
        others[others >= target] += 1  # skip the target itself
        groups.append(others.tolist())
    return groups


def _nearest_references(vectors: np.ndarray) -> list[list[int]]:
    """For each row, its three nearest other rows, third nearest first; ties go to the lower index."""
    squared = (vectors ** 2).sum(axis=1)  # [n]
    distances = squared[:, None] + squared[None, :] - 2.0 * vectors @ vectors.T  # [n, n]
    np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")[:, :MRAR_GROUP_SIZE - 1]  # [n, 3], nearest first
    return order[:, ::-1].tolist()


def _feature_matrix(image_root: str, cate: str, files: list[str], features: Features) -> np.ndarray:
    rows = []
    for name in files:
        if callable(features):
            rows.append(features(os.path.join(image_root, cate, name)))
        else:
            key = f"{cate}/{name}"
            if key not in features:
                raise KeyError(f"no feature for image {key!r} (keys are paths relative to {image_root})")
            value = features[key]
            rows.append(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
    try:
        return np.stack([np.asarray(row, dtype=np.float64).reshape(-1) for row in rows])  # [n, F]
    except ValueError as error:
        raise ValueError(f"features of class {cate} do not all have the same size: {error}") from error


def build_mrar_index(image_root: str, out_path: str, mode: str = "random", seed: int = 0,
                     features: Features | None = None) -> int:
    """Write the MRAR index of ``image_root`` (an ImageFolder) to ``out_path``; return the line count.

    Args:
        mode: 'random' (uniform same-class references) or 'nearest' (nearest same-class neighbours).
        seed: seeds 'random'; each class draws from its own stream (seed, crc32 of its name), so a
            class's lines do not depend on the other classes.
        features: 'nearest' only. A mapping ``"<class>/<file>" -> vector``, or a callable taking the
            image path and returning a vector; None computes :func:`pixel_features`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if features is not None and mode != "nearest":
        raise ValueError("features are only used with mode='nearest'")
    lines = []
    for cate, files in list_class_images(image_root).items():
        if len(files) < MRAR_GROUP_SIZE:
            warnings.warn(f"class {cate!r} has {len(files)} image(s), fewer than {MRAR_GROUP_SIZE}: skipped",
                          stacklevel=2)
            continue
        if mode == "random":
            references = _random_references(len(files), np.random.default_rng([seed, zlib.crc32(cate.encode())]))
        else:
            vectors = _feature_matrix(image_root, cate, files, pixel_features if features is None else features)
            references = _nearest_references(vectors)
        for target, refs in enumerate(references):
            lines.append(json.dumps({"cate": cate, "files": [files[i] for i in refs] + [files[target]]}))
    text = "".join(line + "\n" for line in lines)
    atomic_write(out_path, lambda handle: handle.write(text.encode("utf-8")))
    return len(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True, help="dataset root holding train/<class>/<image>")
    parser.add_argument("--out", required=True, help="output JSON-lines file")
    parser.add_argument("--mode", choices=MODES, default="random", help="how the 3 references are chosen")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mode")
    parser.add_argument("--features", default=None,
                        help="nearest mode: a torch file with a dict '<class>/<file>' -> vector "
                             "(e.g. VAE latent means); default: 8x8 center-cropped pixels")
    parser.add_argument("--feature_size", type=int, default=8, help="side of the default pixel features")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.features is not None and args.mode != "nearest":
        parser.error("--features is only used with --mode nearest")
    features: Features | None = None
    if args.mode == "nearest":
        features = (torch.load(args.features, map_location="cpu", weights_only=True) if args.features
                    else functools.partial(pixel_features, size=args.feature_size))
    count = build_mrar_index(os.path.join(args.data_path, "train"), args.out, args.mode, args.seed, features)
    print(f"wrote {count} MRAR groups to {args.out}")


if __name__ == "__main__":
    run_cli("build_mrar_index.py", main)
