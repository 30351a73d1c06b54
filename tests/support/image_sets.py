"""Small image sets for the FID/IS tests: uniform noise and smooth colour ramps as PNG folders, and their
Inception features and statistics through the stand-in Inception weights (`inception_weights`, tests/conftest.py).
Registered as a pytest plugin by tests/conftest.py."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from util.eval import fidelity

NUM_IMAGES = 12  # per folder; the 299x299 Inception forward costs ~0.2 s per image on one CPU thread
IMAGE_SIZE = 32


def write_pngs(folder: Path, images: np.ndarray) -> None:
    """Save uint8 ``[N, H, W, 3]`` images as ``00000.png`` ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def noise_images(seed: int, count: int = NUM_IMAGES, size: int = IMAGE_SIZE) -> np.ndarray:
    """Uniform-noise uint8 images ``[count, size, size, 3]``."""
    return np.random.RandomState(seed).randint(0, 256, (count, size, size, 3), dtype=np.uint8)


def smooth_images(seed: int, count: int = NUM_IMAGES, size: int = IMAGE_SIZE) -> np.ndarray:
    """Horizontal colour ramps ``[count, size, size, 3]``, statistically far from noise."""
    rng = np.random.RandomState(seed)
    ramp = np.linspace(0.0, 1.0, size)[None, None, :, None]  # [1, 1, W, 1]
    start = rng.uniform(0, 255, (count, 1, 1, 3))
    end = rng.uniform(0, 255, (count, 1, 1, 3))
    images = start + (end - start) * ramp  # [count, 1, W, 3]
    return np.broadcast_to(images, (count, size, size, 3)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of NUM_IMAGES PNGs each: uniform noise and smooth colour ramps."""
    root = tmp_path_factory.mktemp("images")
    write_pngs(root / "noise", noise_images(seed=1))
    write_pngs(root / "smooth", smooth_images(seed=2))
    return {"noise": root / "noise", "smooth": root / "smooth"}


@pytest.fixture(scope="module")
def noise_features(inception_weights, folders):
    """Inception features of the noise folder, extracted once."""
    return fidelity.inception_features(folders["noise"], "cpu", batch_size=8, weights_path=inception_weights,
                                      num_workers=0)


@pytest.fixture(scope="module")
def smooth_statistics(inception_weights, folders):
    """FID statistics of the smooth folder, computed once."""
    return fidelity.statistics_from_folder(folders["smooth"], "cpu", batch_size=8, weights_path=inception_weights,
                                          num_workers=0)
