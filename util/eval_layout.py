"""How evaluation images are laid out, in one place: which class image `index` shows and which seed draws it.

Image `index` of an `num_images`-image run is `{index:05d}.png` and belongs to class
`index // (num_images // class_num)` (the original's class-major order); its noise comes from seed
`(base_seed << 32) + index`, so it is the same image whatever the world size, batch order or resumption.
"""


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
