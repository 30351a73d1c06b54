"""util.eval.images: what counts as an image of one colour, in memory and on disk; grids and their zoom."""
import numpy as np
import pytest
from PIL import Image

from util.eval.images import MIN_GRID_CELL, constant_images, evaluation_grid, grid_zoom, is_constant_png


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


@pytest.mark.parametrize("img_size,zoom", [(8, 8), (16, 4), (24, 3), (32, 2), (63, 2), (64, 1), (256, 1)])
def test_grids_zoom_small_images_to_at_least_64_px(img_size, zoom):
    assert grid_zoom(img_size) == zoom
    assert img_size * zoom >= MIN_GRID_CELL or zoom == 1


def write_indexed_folder(folder, num_images, size=8):
    """`{index:05d}.png` images whose red channel is their index."""
    folder.mkdir()
    for index in range(num_images):
        Image.fromarray(np.full((size, size, 3), (index, 0, 0), dtype=np.uint8)).save(folder / f"{index:05d}.png")


def cell_indices(grid, rows, columns, size, zoom):
    """The red value at the centre of each cell of an `image_grid` (2 px padding), row by row."""
    pixels = np.asarray(grid)
    step = (size + 2) * zoom
    return [[int(pixels[2 * zoom + row * step + size * zoom // 2, 2 * zoom + column * step + size * zoom // 2, 0])
             for column in range(columns)] for row in range(rows)]


def test_an_evaluation_grid_shows_the_first_images_of_each_class_asked_zoomed(tmp_path):
    write_indexed_folder(tmp_path / "images", num_images=12)  # 4 classes of 3 images, class-major
    grid = evaluation_grid(tmp_path / "images", 12, 4, classes=[0, 2, 3], per_class=2)
    assert grid.size == (8 * (2 * 10 + 2), 8 * (3 * 10 + 2))  # 8 px images zoomed 8x: 2 columns, 3 rows
    assert cell_indices(grid, 3, 2, size=8, zoom=8) == [[0, 1], [6, 7], [9, 10]]


def test_an_evaluation_grid_reads_only_the_images_it_shows(tmp_path):
    write_indexed_folder(tmp_path / "images", num_images=12)
    for index in (2, 3, 11):  # not shown: truncated
        (tmp_path / "images" / f"{index:05d}.png").write_bytes(b"")
    grid = evaluation_grid(tmp_path / "images", 12, 4, classes=[0, 2], per_class=2)
    assert cell_indices(grid, 2, 2, size=8, zoom=8) == [[0, 1], [6, 7]]


def test_an_evaluation_grid_shows_every_image_of_a_class_with_fewer_than_asked(tmp_path):
    write_indexed_folder(tmp_path / "images", num_images=12)
    grid = evaluation_grid(tmp_path / "images", 12, 4, classes=[1], per_class=5)
    assert cell_indices(grid, 1, 3, size=8, zoom=8) == [[3, 4, 5]]
