"""scikit-learn's embedded digits written as an ImageFolder, with a manifest that makes the export reusable.

scikit-learn ships 1,797 real handwritten digits (8x8, values 0..16, 10 classes) inside the package, so the
quickstart can train through the real ImageFolder pipeline without any download.

Conventions owned here:
- Layout: ``<root>/{train,val}/<class>/<index>.png`` with class folders ``"0".."9"``. Their sorted order equals
  the label order, so torchvision's ImageFolder assigns label ``d`` to digit ``d``. File names are the
  zero-padded index into ``load_digits()`` (``0042.png``), so every PNG traces back to its source.
- Pixels: the 0..16 grey levels are scaled to 0..255 (``round(v * 255 / 16)``), upsampled to
  ``img_size x img_size`` with PIL's bilinear filter, and saved as RGB with three equal channels.
- Split: stratified ``train_test_split`` (seed 0, 20 % held out -> 1,437 train / 360 val).
- Manifest: ``<root>/digits_export.json`` holds the export settings, ``complete`` and the per-class counts.
"""
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from util.io import save_png, write_json

MANIFEST_NAME = "digits_export.json"
EXPORT_FORMAT_VERSION = 1
SPLITS = ("train", "val")
_DIGITS_MAX_VALUE = 16.0


def _export_settings(img_size: int, val_fraction: float, seed: int) -> dict:
    """The settings that define an export; a manifest must match them exactly to be reused."""
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "source": "sklearn.datasets.load_digits",
        "resize": "PIL bilinear",
        "img_size": int(img_size),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
    }


def read_export_manifest(root) -> dict | None:
    """Return the manifest of a digits export under ``root``, or None when there is none."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _count_pngs(split_dir: Path) -> dict:
    """Number of PNG files per class folder of one split."""
    return {c.name: sum(1 for _ in c.glob("*.png")) for c in sorted(split_dir.iterdir()) if c.is_dir()}


def _is_complete_export(root: Path, settings: dict) -> bool:
    """True when ``root`` holds a finished export with ``settings`` whose files are all on disk."""
    manifest = read_export_manifest(root)
    if manifest is None or not manifest.get("complete") or manifest.get("settings") != settings:
        return False
    return all(
        (root / split).is_dir() and _count_pngs(root / split) == manifest["per_class"][split] for split in SPLITS
    )


def _digit_pixels(digit: np.ndarray, img_size: int) -> np.ndarray:
    """One 8x8 digit with values 0..16 -> uint8 RGB pixels ``[img_size, img_size, 3]``."""
    gray = np.rint(digit * (255.0 / _DIGITS_MAX_VALUE)).astype(np.uint8)  # [8, 8]
    image = Image.fromarray(gray).resize((img_size, img_size), Image.BILINEAR).convert("RGB")
    return np.asarray(image)  # [S, S, 3]


def export_digits(root, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write scikit-learn's digits as an ImageFolder with ``train`` and ``val`` splits under ``root``.

    Args:
        root: output folder; created if missing.
        img_size: side of the saved square images in pixels (bilinear upsampling from 8x8).
        val_fraction: fraction of each class held out in ``val`` (stratified split).
        seed: random state of the split.

    Returns:
        ``{"train": n_train, "val": n_val, "per_class": {split: {class: count}}, "rewritten": bool}``.
        An existing complete export with the same settings is left untouched (``rewritten`` False). A
        previous export with other settings is replaced; a folder that holds ``train``/``val`` but no
        manifest is refused, so nothing that this function did not write is deleted.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    settings = _export_settings(img_size, val_fraction, seed)
    if _is_complete_export(root, settings):
        manifest = read_export_manifest(root)
        return {**manifest["counts"], "per_class": manifest["per_class"], "rewritten": False}

    if read_export_manifest(root) is None and any((root / split).exists() for split in SPLITS):
        raise FileExistsError(
            f"{root} already holds a train/ or val/ folder that is not a digits export "
            f"(no {MANIFEST_NAME}); choose an empty folder"
        )
    manifest_path = root / MANIFEST_NAME
    # Written first and marked incomplete, so a crashed export is recognised as ours and replaced.
    write_json(manifest_path, {"settings": settings, "complete": False})
    for split in SPLITS:
        if (root / split).exists():
            shutil.rmtree(root / split)

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    class_names = [str(c) for c in sorted(set(digits.target.tolist()))]
    index_width = len(str(len(indices) - 1))
    per_class = {}
    for split, split_idx in zip(SPLITS, (train_idx, val_idx)):
        for name in class_names:
            (root / split / name).mkdir(parents=True)
        for i in sorted(split_idx.tolist()):
            label = str(int(digits.target[i]))
            save_png(root / split / label / f"{i:0{index_width}d}.png", _digit_pixels(digits.images[i], img_size))
        per_class[split] = _count_pngs(root / split)

    counts = {split: sum(per_class[split].values()) for split in SPLITS}
    write_json(manifest_path, {"settings": settings, "complete": True, "counts": counts, "per_class": per_class})
    return {**counts, "per_class": per_class, "rewritten": True}
