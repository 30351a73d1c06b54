"""Every evaluation writes a zoomed grid beside its images, a resumed one too."""
import json
from pathlib import Path

from PIL import Image

import engine_transdiff as engine
import main

TINY = ("--model transdiff_tiny --tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --class_num 3 "
        "--buffer_size 4 --device cpu --num_workers 0 --allow_random_weights --metrics=").split()
EVAL = "--evaluate --num_images 6 --eval_bsz 6 --num_sampling_steps 2 --sampler euler".split()


def evaluate(out: Path) -> dict:
    main.cli([*TINY, *EVAL, "--output_dir", str(out)])
    return json.loads((out / "metrics.json").read_text())[-1]


def test_an_evaluation_writes_its_grid_beside_the_images(tmp_path):
    record = evaluate(tmp_path / "out")
    folder = Path(record["folder"])
    assert record["grid"] == str(folder) + "_grid.png"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(6)]  # not among them
    with Image.open(record["grid"]) as grid:
        # 3 classes of 2 images (fewer than GRID_PER_CLASS): 16 px cells zoomed 4x, 2 px padding
        assert grid.size == (4 * (2 * 18 + 2), 4 * (3 * 18 + 2))
    assert engine.GRID_PER_CLASS > 2 and engine.GRID_CLASSES >= 3


def test_a_resumed_evaluation_still_writes_its_grid(tmp_path):
    record = evaluate(tmp_path / "out")
    grid = Path(record["grid"])
    first = grid.read_bytes()
    grid.unlink()
    Path(record["folder"], "00005.png").unlink()  # killed before its last image and its grid
    again = evaluate(tmp_path / "out")
    assert again["folder"] == record["folder"] and grid.read_bytes() == first


def test_the_grid_spreads_up_to_eight_classes_over_the_range():
    assert engine.spread_classes(engine.GRID_CLASSES, 1000) == [0, 143, 285, 428, 571, 714, 856, 999]
    assert engine.spread_classes(engine.GRID_CLASSES, 3) == [0, 1, 2]
