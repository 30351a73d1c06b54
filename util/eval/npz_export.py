"""ADM-style ``.npz`` sample batches.

The ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``), used by DiT, SiT, REPA and VAR
for FID / sFID / IS / precision / recall, reads a sample batch as an ``.npz`` holding one array ``arr_0``
of uint8 images ``[N, H, W, 3]``. ``write_adm_npz`` packs a folder of generated PNGs into that layout
without holding all images in memory: the ``.npy`` member is streamed chunk by chunk into the
(uncompressed, zip64) archive, exactly the container ``np.savez`` would write.
"""
import os
import zipfile
from typing import BinaryIO

import numpy as np

from util.eval.images import list_pngs, read_rgb
from util.io import atomic_write

PathLike = str | os.PathLike


def write_adm_npz(image_dir: PathLike, out_path: PathLike, shuffle_seed: int = 0, chunk_size: int = 1000) -> int:
    """Pack every ``*.png`` of ``image_dir`` into an ADM sample batch ``out_path`` and return the image count.

    Args:
        image_dir: folder of same-sized PNGs (not searched recursively).
        out_path: destination ``.npz``; written atomically, used exactly as given (no suffix added).
        shuffle_seed: seed of the ``np.random.RandomState`` permutation applied to the sorted file list.
            Our samples are written class-major (50 consecutive images per class), and the ADM evaluator
            computes the Inception Score over *contiguous* splits of 5000 images without shuffling, so an
            unshuffled batch would give every split only 100 classes and bias IS low. FID, sFID,
            precision and recall do not depend on the order.
        chunk_size: images decoded and written per step; bounds memory to ``chunk_size * H * W * 3`` bytes.
    """
    files = list_pngs(image_dir)
    if not files:
        raise ValueError(f"no *.png files in {image_dir}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    order = np.random.RandomState(shuffle_seed).permutation(len(files))
    height, width, _ = read_rgb(files[order[0]]).shape
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(files), height, width, 3)}

    def write(handle: BinaryIO) -> None:
        with (zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED) as archive,
              archive.open("arr_0.npy", mode="w", force_zip64=True) as member):
            np.lib.format.write_array_header_1_0(member, header)
            for start in range(0, len(files), chunk_size):
                chunk = np.stack([read_rgb(files[i], (height, width))
                                  for i in order[start:start + chunk_size]])  # [n, H, W, 3]
                member.write(chunk.tobytes())

    atomic_write(str(out_path), write)
    return len(files)
