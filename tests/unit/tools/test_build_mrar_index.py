"""tools/build_mrar_index.py: grouping rules, determinism, CLI, and compatibility with MRARDataset."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tools.build_mrar_index import build_mrar_index


def _folder(root: Path, counts: dict) -> Path:
    for cate, count in counts.items():
        (root / cate).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(root / cate / f"{i:02d}.png")
    return root


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_random_groups_are_valid_and_every_image_is_a_target_once(tmp_path):
    root = _folder(tmp_path / "train", {"a": 6, "b": 4})
    count = build_mrar_index(str(root), str(tmp_path / "idx.jsonl"), seed=3)
    lines = _read(tmp_path / "idx.jsonl")
    assert count == len(lines) == 10
    for line in lines:
        assert len(set(line["files"])) == 4
        assert all((root / line["cate"] / name).is_file() for name in line["files"])  # same class
    targets = sorted((line["cate"], line["files"][3]) for line in lines)
    assert targets == sorted([("a", f"{i:02d}.png") for i in range(6)] + [("b", f"{i:02d}.png") for i in range(4)])


def test_random_mode_is_deterministic_for_a_seed(tmp_path):
    root = _folder(tmp_path / "train", {"a": 12})
    build_mrar_index(str(root), str(tmp_path / "one.jsonl"), seed=0)
    build_mrar_index(str(root), str(tmp_path / "two.jsonl"), seed=0)
    build_mrar_index(str(root), str(tmp_path / "three.jsonl"), seed=1)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert (tmp_path / "one.jsonl").read_text() != (tmp_path / "three.jsonl").read_text()


def test_small_classes_are_skipped_with_a_warning(tmp_path):
    root = _folder(tmp_path / "train", {"big": 4, "small": 3})
    with pytest.warns(UserWarning, match="'small' has 3 image"):
        build_mrar_index(str(root), str(tmp_path / "idx.jsonl"))
    assert {line["cate"] for line in _read(tmp_path / "idx.jsonl")} == {"big"}


def test_nearest_mode_picks_the_actual_nearest_neighbours(tmp_path):
    root = _folder(tmp_path / "train", {"a": 6, "b": 4})
    positions = {"a/00.png": 0.0, "a/01.png": 1.0, "a/02.png": 3.0, "a/03.png": 6.0, "a/04.png": 10.0,
                 "a/05.png": 15.0, "b/00.png": 0.0, "b/01.png": 100.0, "b/02.png": 101.0, "b/03.png": 103.0}
    features = {key: torch.tensor([value, 0.0]) for key, value in positions.items()}
    build_mrar_index(str(root), str(tmp_path / "idx.jsonl"), mode="nearest", features=features)
    groups = {(line["cate"], line["files"][3]): line["files"][:3] for line in _read(tmp_path / "idx.jsonl")}
    # third nearest first, nearest last (right before the target)
    assert groups[("a", "00.png")] == ["03.png", "02.png", "01.png"]
    assert groups[("a", "04.png")] == ["02.png", "05.png", "03.png"]
    assert groups[("b", "00.png")] == ["03.png", "02.png", "01.png"]  # never crosses into class a


def test_nearest_mode_with_a_callable_and_default_pixel_features(tmp_path):
    root = _folder(tmp_path / "train", {"a": 5})
    build_mrar_index(str(root), str(tmp_path / "f.jsonl"), mode="nearest",
                     features=lambda path: [float(Path(path).stem)])
    assert _read(tmp_path / "f.jsonl")[2]["files"] == ["00.png", "03.png", "01.png", "02.png"]
    build_mrar_index(str(root), str(tmp_path / "p.jsonl"), mode="nearest")  # red ramp: same order
    assert _read(tmp_path / "p.jsonl")[4]["files"] == ["01.png", "02.png", "03.png", "04.png"]


def test_bad_arguments_raise(tmp_path):
    root = _folder(tmp_path / "train", {"a": 4})
    with pytest.raises(ValueError, match="unknown mode"):
        build_mrar_index(str(root), str(tmp_path / "x.jsonl"), mode="farthest")
    with pytest.raises(ValueError, match="only used with mode='nearest'"):
        build_mrar_index(str(root), str(tmp_path / "x.jsonl"), features={})
    with pytest.raises(KeyError, match="a/00.png"):
        build_mrar_index(str(root), str(tmp_path / "x.jsonl"), mode="nearest", features={})
