"""Every ```python block of the README and the docs runs as written, in a folder with the repository's `assets/`
and a checkpoint in the original's format, `their.pth`. Released models are far too big for a test: a block that
calls `load_pretrained(name)` gets a stand-in of the same mode (1-step or MRAR, the quickstart's model flags, random
weights) with the released model's sampling settings, so the names, arguments and return values the block uses are
checked, not the download (tests/unit/tools/test_download.py checks that against a local Hub)."""
import argparse
import re

import numpy as np
import pytest
import torch

import quickstart
from tests.support import REPO_ROOT
from util import pretrained
from util.checkpoint import load_checkpoint, save_checkpoint
from util.presets import SAMPLING_PRESETS
from util.settings import get_args_parser, resolve_args

PAGES = ["README.md", *sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, number, block) for page in PAGES
          for number, block in enumerate(re.findall(r"```python\n(.*?)```", (REPO_ROOT / page).read_text(), re.S))]


def write_checkpoint(path, *extra):
    settings = vars(resolve_args(get_args_parser().parse_args([*quickstart.MODEL_FLAGS, *extra])))
    torch.manual_seed(0)
    model = pretrained.build_model(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(path), {"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 99,
                                "args": settings})
    return path


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").symlink_to(REPO_ROOT / "assets")
    stand_ins = {False: write_checkpoint(tmp_path / "one_step.pth", "--class_num", "1000"),
                 True: write_checkpoint(tmp_path / "mrar.pth", "--class_num", "1000", "--mrar", "--patch_size", "2")}
    weights = load_checkpoint(str(stand_ins[False]))["model"]  # in the original's format: args as a Namespace
    torch.save({"model": weights, "epoch": 9, "args": argparse.Namespace(model="transdiff_tiny")}, "their.pth")

    def load_pretrained(name, device="cpu", **overrides):
        assert name in SAMPLING_PRESETS and torch.device(device).type in ("cpu", "cuda")
        released = pretrained.released_settings(name)
        sampling = {key: released[key] for key in ("sampler", "cfg", "scale_0", "scale_1")}
        return pretrained.load_checkpoint_model(str(stand_ins[SAMPLING_PRESETS[name].mrar]), "cpu",
                                                **sampling | {"num_sampling_steps": 2} | overrides)

    monkeypatch.setattr(pretrained, "load_pretrained", load_pretrained)
    return tmp_path


def test_the_pages_have_python_blocks():
    assert {page for page, _, _ in BLOCKS} >= {"README.md", "docs/evaluation.md"}


@pytest.mark.parametrize("page, number, block", BLOCKS, ids=[f"{page}#{number}" for page, number, _ in BLOCKS])
def test_a_python_block_runs_as_written(page, number, block, folder):
    namespace = {"__name__": f"{page}#{number}"}
    exec(compile(block, f"{page} python block {number}", "exec"), namespace)
    arrays = {name: value for name, value in namespace.items() if isinstance(value, np.ndarray)}
    assert all(array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3 for array in arrays.values())


def test_the_readme_block_draws_three_digits(folder):
    (page, number, block), = [entry for entry in BLOCKS if entry[0] == "README.md"]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["digits"].shape == (3, 16, 16, 3)
