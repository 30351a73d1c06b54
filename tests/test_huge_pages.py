"""main.py puts torch's large CPU tensors on transparent huge pages unless the environment says otherwise.

Checked in a fresh process through the memory map: the region that holds a 16 MiB tensor carries the kernel's
`hg` flag (madvise(MADV_HUGEPAGE)) whether or not the kernel found huge pages for it at that moment.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import main
import torch

tensor = torch.ones(2 ** 22)  # 16 MiB
address = tensor.data_ptr()
region = None
with open("/proc/self/smaps") as smaps:
    for line in smaps:
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(bound, 16) for bound in first.split("-"))
            region = start <= address < end
        elif region and line.startswith("VmFlags:"):
            print("huge" if "hg" in line.split()[1:] else "plain")
            break
"""

pytestmark = pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
                                reason="Linux with transparent huge pages only")


def tensor_pages(environment_value):
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    if environment_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = environment_value
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()


def test_main_asks_for_huge_pages_before_torch_allocates():
    assert tensor_pages(None) == "huge"


def test_the_environment_can_opt_out():
    assert tensor_pages("0") == "plain"
