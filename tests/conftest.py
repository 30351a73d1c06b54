"""Shared pytest fixtures: the parity folder and a deterministic, single-threaded torch."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Two cores are shared by every process on the CI machine; one thread per process avoids
# OpenMP oversubscription, which ran 4-6x slower than a single thread here.
torch.set_num_threads(1)


def _parity_dir() -> Path:
    explicit = os.environ.get("TRANSDIFF_PARITY_DIR")
    if explicit:
        return Path(explicit)
    return REPO_ROOT.parent / "shared" / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    path = _parity_dir()
    if not (path / "tiny_model.pt").is_file():
        pytest.fail(f"golden tensors not found in {path}; set TRANSDIFF_PARITY_DIR to the shared/parity folder")
    return path
