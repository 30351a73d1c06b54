"""The one conversion of a decoded image to 8-bit RGB, keeping its range: PIL's own ``convert("RGB")`` clips
16-bit grey (``I;16``, or ``I`` as PNG decoding gives it) to white instead of scaling it."""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def as_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: 16-bit grey scaled by 255/65535 (rounded); a mode without a known range (32-bit
    integers beyond 16 bits, floats) raises ValueError; every other mode as PIL converts it."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)  # [H, W]
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} pixels outside 0..65535 have no known range")
        grey = np.rint(values * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no known range")
    return image.convert("RGB")
