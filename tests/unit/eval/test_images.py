"""util.eval.images: what counts as an image of one colour, in memory and on disk."""
import numpy as np
from PIL import Image

from util.eval.images import constant_images, is_constant_png


def test_one_colour_all_over_is_constant_and_any_other_pixel_is_not(tmp_path):
    images = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    images[1] = (200, 10, 30)  # one colour, not grey
    images[2, 4, 5, 1] = 1  # one pixel differs
    images[3] = np.arange(3, dtype=np.uint8)  # every pixel (0, 1, 2)
    assert constant_images(images) == 3
    for index, constant in enumerate((True, True, False, True)):
        path = tmp_path / f"{index}.png"
        Image.fromarray(images[index]).save(path)
        assert is_constant_png(path) is constant
