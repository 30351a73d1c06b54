"""docs/training.md's recipe for your own folder of images, run as the page shows it: its two `python main.py`
commands are read from the page, the paths `data/mine` and `out/mine` replaced by temporary folders and the
number after `--epochs` by `EPOCHS`; every other flag is the page's."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine_transdiff import GRID_PER_CLASS
from tests.support import REPO_ROOT
from tests.support.docs import page_commands
from util.eval.images import grid_zoom

PAGE = "docs/training.md"
EPOCHS = 3  # the page's --epochs is for minutes of training; the test wants seconds
SHAPES = ("circle", "square", "triangle")
IMAGES_PER_CLASS = 24


def write_shapes(root: Path, size: int) -> None:
    """<root>/train/<shape>/<i>.png: a light shape of random size and place on a dark background."""
    rng = np.random.RandomState(0)
    for shape in SHAPES:
        folder = root / "train" / shape
        folder.mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.randint(0, 80, 3)))
            colour = tuple(int(v) for v in rng.randint(120, 256, 3))
            radius = rng.uniform(0.25, 0.4) * size
            x, y = rng.uniform(radius, size - radius, 2)
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
            elif shape == "square":
                draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
            else:
                draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)
            image.save(folder / f"{index:03d}.png")


def recipe() -> tuple[list[str], list[str]]:
    """The page's training and evaluation commands, as words."""
    commands = [shlex.split(command) for command in page_commands(PAGE) if "data/mine" in command]
    assert len(commands) == 2, commands
    train, evaluate = sorted(commands, key=lambda words: "--evaluate" in words)
    assert "--evaluate" in evaluate and "--evaluate" not in train
    return train, evaluate


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def localised(words: list[str], data: Path, out: Path) -> list[str]:
    """The command with the page's folders replaced by the test's and --epochs by EPOCHS."""
    words = [re.sub(r"^out/mine", str(out), re.sub(r"^data/mine", str(data), word)) for word in words]
    if "--epochs" in words:
        words[words.index("--epochs") + 1] = str(EPOCHS)
    return words


def run(words: list[str], env: dict) -> subprocess.CompletedProcess:
    assert words[:2] == ["python", "main.py"], words
    result = subprocess.run([sys.executable, *words[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_the_recipe_for_your_own_images_trains_and_evaluates_as_shown(tmp_path):
    train, evaluate = recipe()
    img_size, class_num = int(flag(train, "--img_size")), int(flag(train, "--class_num"))
    assert class_num == len(SHAPES) and flag(train, "--data_path") == "data/mine"
    data, out = tmp_path / "mine", tmp_path / "out"
    write_shapes(data, img_size)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "TORCH_HOME": str(tmp_path / "torch_home")}  # no Inception weights: KID is skipped with its message

    run(localised(train, data, out), env)
    assert (out / "checkpoint-last.pth").is_file()
    assert (out / "previews" / f"epoch{EPOCHS - 1:04d}.png").is_file()

    run(localised(evaluate, data, out), env)
    record = json.loads((out / "metrics.json").read_text())[-1]
    num_images = int(flag(evaluate, "--num_images"))
    folder = Path(record["folder"])
    assert record["epoch"] == str(EPOCHS - 1) and record["num_images"] == num_images
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(num_images)]
    assert "kid" in record["metrics_skipped"]
    per_class, zoom = min(GRID_PER_CLASS, num_images // class_num), grid_zoom(img_size)
    with Image.open(record["grid"]) as grid:
        assert grid.size == (zoom * (per_class * (img_size + 2) + 2), zoom * (class_num * (img_size + 2) + 2))
