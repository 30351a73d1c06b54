"""How main.py's process gets CPU memory from Linux: torch's large tensors on transparent huge pages, and freed
memory kept for the next tensors (`util.cpu_memory`), each unless the environment says otherwise. Both settings
are process-wide, so each check runs main.py's entry in a fresh process (`python main.py --help`), then:

* the region of the memory map that holds a 16 MiB tensor: the kernel's `hg` flag (madvise(MADV_HUGEPAGE))
  says huge pages were asked for, whether or not the kernel found any at that moment;
* the page faults of each of 12 rounds of a 64 MiB tensor allocated, filled and freed. glibc's defaults map it
  anew every round, every page faulted in (16384 of 4 KiB, or 32 huge ones where the kernel gives huge pages).
  Kept, the heap grows over the first few rounds (its free blocks fit an aligned request of the same size only
  once two of them have merged), then serves it without faults.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from util.cpu_memory import runs_on_glibc

REPO_ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource
import runpy
import sys

sys.argv = ["main.py", "--help"]
try:
    runpy.run_path("main.py", run_name="__main__")
except SystemExit:
    pass
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
            print("PAGES", "huge" if "hg" in line.split()[1:] else "plain")
            break

def faults_of_a_new_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(2 ** 24)  # 64 MiB
    del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print("FAULTS", *(faults_of_a_new_tensor() for _ in range(12)))
"""

THP_SUPPORTED = Path("/sys/kernel/mm/transparent_hugepage").is_dir()

pytestmark = pytest.mark.skipif(not runs_on_glibc(), reason="glibc (Linux) only")


def probe(**environment):
    """The page kind of a 16 MiB tensor and the page faults of each 64 MiB round in a process with `environment`
    on top of this one's, less its settings of either."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES") and not key.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env={**env, **environment},
                            capture_output=True, text=True, check=True)
    fields = dict(line.split(maxsplit=1) for line in result.stdout.splitlines() if line.startswith(("PAGES ",
                                                                                                     "FAULTS ")))
    return fields["PAGES"], [int(faults) for faults in fields["FAULTS"].split()]


def test_main_asks_for_huge_pages_and_keeps_freed_memory():
    pages, faults = probe()
    assert pages == ("huge" if THP_SUPPORTED else "plain")
    assert max(faults[6:]) < 32, faults  # the freed memory reused


def test_the_environment_can_opt_out_of_both():
    pages, faults = probe(THP_MEM_ALLOC_ENABLE="0", MALLOC_MMAP_MAX_="65536")
    assert pages == "plain"
    assert min(faults) >= 32, faults  # mapped anew every round: every page faulted in, huge pages or not


def test_glibc_tunables_take_precedence():
    _, faults = probe(GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
    assert min(faults) >= 32, faults  # mapped anew every round: every page faulted in, huge pages or not
