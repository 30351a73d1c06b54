"""Keep the CPU memory a process frees for its next tensors instead of handing it back to Linux (glibc).

torch allocates CPU tensors with the C library's malloc and frees them with free. glibc's malloc maps a large
block on its own (above a threshold that it raises at run time as such blocks are freed, at most to 32 MiB)
and unmaps it when it is freed, and it trims its heap when enough is free at the top.
A training step frees and allocates the same large activations again, so every step faults those pages in
anew, each one zeroed by the kernel. A `fast` CPU training step at TransDiff-B (huge pages on) had 17-52
thousand page faults and 0.5-1.3 s of system time a step with glibc's defaults; with `keep_freed_memory`, after
the first steps had grown the heap, at most a few hundred and 0.01-0.06 s, and the steps were 5-8% shorter at a
0.16 GiB lower peak (README: Training, CPU memory).

`main.py` calls `keep_freed_memory` when it starts. glibc's own settings in the environment (`MALLOC_MMAP_MAX_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`, or `glibc.malloc` tunables in
`GLIBC_TUNABLES`) take precedence: with any of them set it changes nothing, so that
`MALLOC_MMAP_MAX_=65536` (glibc's default) restores glibc's behaviour.
"""
from __future__ import annotations

import ctypes
import os

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2 ** 31 - 1  # the largest value mallopt takes (an int)

GLIBC_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def runs_on_glibc() -> bool:
    """Whether this process runs on glibc, as the running C library itself says (not guessed from a binary)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no os.confstr (Windows), or a C library without the name
        return False


def environment_sets_malloc() -> bool:
    """Whether the environment already tells glibc's malloc how to map and trim."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in GLIBC_MALLOC_ENVIRONMENT) or "glibc.malloc." in tunables


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heaps (no block mapped on its own) and never trim them, so
    that freed memory is reused without page faults. Process-wide and for the rest of its life; the peak stays
    that of the live tensors plus the heaps' fragmentation. Returns whether it applied: False with another C
    library than glibc, and where `environment_sets_malloc`."""
    if not runs_on_glibc() or environment_sets_malloc():
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
