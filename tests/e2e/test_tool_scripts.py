"""The tools run as scripts and as modules, as a user starts them (real processes)."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.support import REPO_ROOT
from util.data.datasets import MRARDataset


@pytest.mark.parametrize("entry", [["tools/digits_metrics.py"], ["-m", "tools.digits_metrics"]])
def test_digits_metrics_runs_as_script_and_module(entry):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, *entry, "--help"],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--num_images" in result.stdout


def test_build_mrar_index_script_writes_an_index_that_mrar_dataset_reads(tmp_path):
    for cate, count in {"a": 4, "b": 5}.items():
        (tmp_path / "data" / "train" / cate).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(tmp_path / "data" / "train" / cate / f"{i:02d}.png")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "build_mrar_index.py"), "--data_path",
                             str(tmp_path / "data"), "--out", str(tmp_path / "idx.jsonl"), "--seed", "0"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    assert "wrote 9 MRAR groups" in result.stdout
    dataset = MRARDataset(str(tmp_path / "data" / "train"), str(tmp_path / "idx.jsonl"))
    assert len(dataset) == 9
    *images, label = dataset[8]
    assert len(images) == 4 and label == 1
