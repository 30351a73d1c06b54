"""demo.ipynb runs top to bottom on the CPU against a tiny 1-step and a tiny MRAR checkpoint, and the outputs it is
shipped with are what it draws today from its own checkpoint."""
import base64
import io

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from tests.support import REPO_ROOT
from tests.support.runs import TINY
from util import pretrained
from util.checkpoint import save_checkpoint
from util.settings import get_args_parser, resolve_args

# Appended after the notebook's config cell: few classes, images and steps.
SMALL_SETTINGS = ("CLASSES = [0, 1, 2]\nPER_CLASS = 2\nMIX_CLASSES = (0, 2)\nCFG_SWEEP = [1.0, 3.0]\n"
                  "SAMPLING = dict(sampler='euler', num_sampling_steps=3, cfg=1.5)\n")


def write_tiny_checkpoint(path, mrar: bool) -> None:
    """An untrained transdiff_tiny in the training checkpoint format, with the flags it was built by."""
    extra = ["--mrar", "--patch_size", "2"] if mrar else []
    settings = vars(resolve_args(get_args_parser().parse_args([*TINY, *extra])))
    model = pretrained.build_model(settings)
    save_checkpoint(str(path), {"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 0,
                                "args": settings})


def execute(notebook):
    NotebookClient(notebook, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def images(cell) -> list:
    """The cell's PNG outputs as uint8 arrays."""
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"]))))
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


@pytest.mark.parametrize("mrar", [False, True], ids=["one_step", "mrar"])
def test_demo_notebook_runs_every_cell(tmp_path, monkeypatch, mrar):
    checkpoint = tmp_path / "checkpoint-last.pth"
    write_tiny_checkpoint(checkpoint, mrar)
    monkeypatch.setenv("TRANSDIFF_DEMO_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(REPO_ROOT / "demo.ipynb", as_version=4)
    config = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    assert "TRANSDIFF_DEMO_CHECKPOINT" in notebook.cells[config].source
    notebook.cells.insert(config + 1, nbformat.v4.new_code_cell(SMALL_SETTINGS))

    code_cells = execute(notebook)

    printed = "".join(out.get("text", "") for cell in code_cells for out in cell.outputs)
    assert f"{checkpoint} (model_ema): transdiff_tiny" in printed
    assert ("no MRAR chain" in printed) != mrar
    assert sum(len(images(cell)) for cell in code_cells) == (4 if mrar else 3)


def test_the_shipped_outputs_are_what_the_notebook_draws_today(monkeypatch):
    """The committed outputs come from the committed digits checkpoint; executing the notebook again reproduces
    every image (within two levels of 255, the float differences between CPUs) and every printed line."""
    monkeypatch.delenv("TRANSDIFF_DEMO_CHECKPOINT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shipped = nbformat.read(REPO_ROOT / "demo.ipynb", as_version=4)
    shipped_cells = [cell for cell in shipped.cells if cell.cell_type == "code"]
    assert sum(len(images(cell)) for cell in shipped_cells) == 3, "run the notebook and save it with its outputs"
    again = execute(nbformat.read(REPO_ROOT / "demo.ipynb", as_version=4))
    for before, after in zip(shipped_cells, again):
        assert [out.get("text") for out in before.outputs] == [out.get("text") for out in after.outputs]
        old, new = images(before), images(after)
        assert [image.shape for image in old] == [image.shape for image in new]
        for a, b in zip(old, new):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
