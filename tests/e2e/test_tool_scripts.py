"""The tools run as scripts and as modules, as a user starts them (real processes)."""
import os
import re
import subprocess
import sys
import textwrap

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


def test_production_benchmark_times_main_py_by_its_own_progress_lines():
    """benchmarks/production.py (run by benchmarks/gpu.sh on a GPU), at a CPU's scale."""
    result = subprocess.run(
        [sys.executable, "benchmarks/production.py", "--model", "transdiff_tiny", "--tokenizer", "pixel", "--img_size",
         "16", "--vae_stride", "2", "--vae_embed_dim", "12", "--device", "cpu", "--batch_size", "4", "--steps", "21",
         "--num_workers", "1", "--eval_images", "16", "--eval_bsz", "8", "--sampling_steps", "2"],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"training, batch 4 x mul 4 per GPU, 1 window\(s\) after the first: \S+ images/s, \S+ model "
                     r"TFLOP/s\n", result.stdout), result.stdout
    assert re.search(r"evaluation, batch 8, 2 steps: \S+ s per image", result.stdout), result.stdout


def test_the_scores_of_a_real_mutmut_run(tmp_path):
    """`is_positive` has a test that kills `a >= 0` and misses `a > 1`; `double` has no test."""
    (tmp_path / "arith.py").write_text(textwrap.dedent("""\
        def is_positive(a):
            return a > 0


        def double(a):
            return a * 2
        """))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_arith.py").write_text(
        "from arith import is_positive\n\n\ndef test_is_positive():\n    assert not is_positive(0)\n")
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""\
        [tool.mutmut]
        source_paths = ["arith.py"]
        pytest_add_cli_args_test_selection = ["tests"]
        pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
        """))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MUTANT", "PYTEST"))}
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", "1"], cwd=tmp_path, env=env, check=True, capture_output=True)
    results = subprocess.run([*mutmut, "results", "--all", "true"], cwd=tmp_path, env=env, check=True,
                             capture_output=True, text=True).stdout
    table = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "mutation_scores.py")], input=results,
                           capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[2:] == ["| `arith` | 4 | 1 | 1 | 2 | 25 % |"], results
