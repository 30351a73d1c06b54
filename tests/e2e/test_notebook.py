"""demo.ipynb runs top to bottom on the CPU, against a tiny 1-step and a tiny MRAR checkpoint."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from models.transdiff import TRANSDIFF_MODELS
from tests.support import REPO_ROOT
from util.checkpoint import save_checkpoint

# Appended after the notebook's config cell: few classes, images and steps.
SMALL_SETTINGS = "CLASSES = [0, 1, 2]\nPER_CLASS = 2\nCFG_SWEEP = [1.0, 3.0]\nSTEPS = 3\n"


def write_tiny_checkpoint(path: Path, mrar: bool) -> dict:
    """An untrained transdiff_tiny in the training checkpoint format; returns the notebook's MODEL_FLAGS."""
    flags = dict(mrar=mrar, patch_size=2 if mrar else 1, img_size=32, class_num=10, buffer_size=16)
    model = TRANSDIFF_MODELS["transdiff_tiny"](**flags, vae_stride=2, vae_embed_dim=12)
    save_checkpoint(str(path), {"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 0,
                                "args": {"model": "transdiff_tiny", **flags}})
    return flags


def image_outputs(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


@pytest.mark.parametrize("mrar", [False, True], ids=["one_step", "mrar"])
def test_demo_notebook_runs_every_cell(tmp_path, monkeypatch, mrar):
    checkpoint = tmp_path / "checkpoint-last.pth"
    flags = write_tiny_checkpoint(checkpoint, mrar)
    monkeypatch.setenv("TRANSDIFF_DEMO_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(REPO_ROOT / "demo.ipynb", as_version=4)
    config = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    assert "TRANSDIFF_DEMO_CHECKPOINT" in notebook.cells[config].source
    notebook.cells.insert(config + 1, nbformat.v4.new_code_cell(SMALL_SETTINGS + f"MODEL_FLAGS = {flags!r}\n"))

    NotebookClient(notebook, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(REPO_ROOT)}}).execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    printed = "".join(out.get("text", "") for cell in code_cells for out in cell.outputs)
    assert str(checkpoint) in printed and "'model_ema' weights" in printed
    assert ("no MRAR chain" in printed) != mrar
    assert sum(image_outputs(cell) for cell in code_cells) == (4 if mrar else 3)
