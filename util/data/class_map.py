"""Class names: ImageNet's 1000 classes in their index order, and the class map of a finetune onto your own classes.

A class map (``--class_map FILE``) is a text file with one line per class of your data that a pretrained class
should start it: ``<your class folder name> <pretrained class index, or ImageNet wnid such as n01440764>``. Blank
lines and lines starting with ``#`` are skipped. Classes it does not name start from a fresh class embedding row.
"""
from __future__ import annotations

import functools
from pathlib import Path

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.tsv")  # "<wnid>\t<names>" in index order


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """ImageNet-1k's (wnid, names) pairs; the position is the class index of every released model."""
    lines = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(tuple(line.split("\t", 1)) for line in lines)


@functools.cache
def _wnid_indices() -> dict[str, int]:
    return {wnid: index for index, (wnid, _) in enumerate(imagenet_classes())}


def imagenet_index(wnid: str) -> int | None:
    """The class index of an ImageNet wnid (``n01440764``), or None."""
    return _wnid_indices().get(wnid)


def _pretrained_class(text: str, where: str) -> int:
    if text.isdigit():
        return int(text)
    index = imagenet_index(text)
    if index is None:
        raise ValueError(f"{where}: {text!r} is neither a class index nor an ImageNet wnid (such as n01440764)")
    return index


def read_class_map(path: str, class_names: list[str]) -> dict[int, int]:
    """The rows of a finetune's class embedding to copy: {your class index: pretrained class index}.

    ``class_names`` are the classes of the training data in index order (the sorted class folders). Raises
    ValueError naming the file and line for an unknown class folder, a class mapped twice or an unreadable target;
    FileNotFoundError when the file is missing. Whether a pretrained index exists is checked against the checkpoint.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--class_map {path}: no such file")
    index_of = {name: index for index, name in enumerate(class_names)}
    rows: dict[int, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--class_map {path}, line {number}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{where}: expected '<class folder> <pretrained class index or wnid>', got {line!r}")
        folder, target = parts
        if folder not in index_of:
            shown = ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else "")
            raise ValueError(f"{where}: {folder!r} is not a class folder of the training data ({shown})")
        if index_of[folder] in rows:
            raise ValueError(f"{where}: class {folder!r} is mapped twice")
        rows[index_of[folder]] = _pretrained_class(target, where)
    return rows
