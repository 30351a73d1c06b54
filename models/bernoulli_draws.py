"""Dropout noise and masks drawn from torch's CPU generator exactly as `F.dropout` draws them, in one pass.

On every CPU but Intel's, torch's Bernoulli kernel (`bernoulli_(p)`) asks the generator for each element in
turn: two 32-bit Mersenne Twister outputs through a call and a branch each, 6-7 ns an element on this
project's Zen 4 machine, 10% of a lean TransDiff-B training step. `models/bernoulli_draws.c` makes the same
draws from the same generator state, a whole state of 624 outputs at a time in loops the compiler vectorises,
and writes the bool mask and the float32 noise together: under 1 ns an element. On Intel CPUs torch draws with
MKL instead (other values), so there `dropout_draws` keeps torch's own kernel.

The C file is compiled with the system C compiler (`$CC`, else `cc`, `gcc` or `clang`) into a temporary
directory when the first draw needs it, once per process (0.15 s with the check against torch). It is used
only after it has reproduced torch's own draws and generator state in this process; without a compiler, or
where it does not reproduce torch (another generator, another state layout), `dropout_draws` is torch's
kernel. The generator state is read and written through `torch.get_rng_state` and `torch.set_rng_state`,
outside torch's generator lock: another thread drawing from torch's default CPU generator at the same moment
could interleave with a draw.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

SOURCE = Path(__file__).with_suffix(".c")
MERSENNE_WORDS = 624
UNIFORM_BITS = 53  # torch draws a double uniform from 53 of a 64-bit output's bits
CHECK_ELEMENTS = 1500  # the self-check's draw: 3000 outputs, several regenerations of the state


class _LegacyGeneratorState(ctypes.Structure):
    """The start of torch's CPU generator state buffer (at::CPUGeneratorImplStateLegacy)."""
    _fields_ = [("the_initial_seed", ctypes.c_uint64), ("left", ctypes.c_int32), ("seeded", ctypes.c_int32),
                ("next", ctypes.c_uint64), ("state", ctypes.c_uint64 * MERSENNE_WORDS),
                ("normal_x", ctypes.c_double), ("normal_y", ctypes.c_double), ("normal_rho", ctypes.c_double),
                ("normal_is_valid", ctypes.c_int32)]


class _GeneratorState(ctypes.Structure):
    """torch's CPU generator state buffer (at::CPUGeneratorImplState), as `torch.get_rng_state` returns it."""
    _fields_ = [("legacy_pod", _LegacyGeneratorState), ("next_float_normal_sample", ctypes.c_float),
                ("is_next_float_normal_sample_valid", ctypes.c_bool)]


def torch_noise_and_mask(like: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU dropout noise for a tensor like `like` (0 or 1/(1-p), drawn as `F.dropout` draws it) and its
    bool mask."""
    noise = torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)
    return noise, noise.ne(0)


def _compile(directory: str) -> Optional[ctypes.CDLL]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    library = os.path.join(directory, "bernoulli_draws.so")
    for machine_flags in (["-march=native"], []):  # the second for compilers that do not know the flag
        command = [compiler, "-O3", *machine_flags, "-shared", "-fPIC", str(SOURCE), "-o", library]
        try:
            if subprocess.run(command, capture_output=True, timeout=120).returncode == 0:
                return ctypes.CDLL(library)
        except (OSError, subprocess.SubprocessError):
            return None
    return None


Draw = Callable[[torch.Tensor, float], Tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def _threshold_and_scale(p: float, dtype: torch.dtype) -> Tuple[int, float]:
    """For dropout p: the 53-bit integers below the threshold are kept, and a kept element's noise (1/(1-p) in
    `dtype`, as torch computes it). Once per p, not at every draw."""
    keep_prob = 1 - p
    return (math.ceil(Fraction(keep_prob) * 2 ** UNIFORM_BITS),
            torch.ones((), dtype=dtype).div_(keep_prob).item())


def compiled_draw() -> Optional[Draw]:
    """`torch_noise_and_mask`'s counterpart from the C file, compiled now and not checked against torch (that is
    `vectorised_draw`'s part), for contiguous float32 CPU tensors; None without a working C compiler."""
    try:
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as directory:
            library = _compile(directory)  # loaded, so the file may go with the directory
    except OSError:  # no temporary directory to write to
        return None
    if library is None:
        return None
    draw_dropout = library.draw_dropout
    draw_dropout.restype = None
    draw_dropout.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                             ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]

    def draw(like: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
        threshold, scale = _threshold_and_scale(p, like.dtype)
        noise = torch.empty(like.shape, dtype=like.dtype)  # then the mask: torch_noise_and_mask's order (lower peak)
        kept = torch.empty(like.shape, dtype=torch.bool)
        buffer = torch.get_rng_state()
        state = _GeneratorState.from_buffer(buffer.numpy())
        draw_dropout(ctypes.addressof(state.legacy_pod.state),
                     ctypes.addressof(state) + _LegacyGeneratorState.left.offset,
                     ctypes.addressof(state) + _LegacyGeneratorState.next.offset,
                     kept.numel(), threshold, scale, kept.data_ptr(), noise.data_ptr())
        torch.set_rng_state(buffer)
        return noise, kept

    return draw


def _reproduces_torch(draw: Draw) -> bool:
    """Whether `draw` gives torch's noise and mask and leaves the generator where torch's kernel leaves it."""
    like = torch.empty(CHECK_ELEMENTS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.rand(7)  # start mid-state, an odd number of outputs in
        expected, expected_kept = torch_noise_and_mask(like, 0.1)
        expected_state = torch.get_rng_state()
        torch.manual_seed(0)
        torch.rand(7)
        noise, kept = draw(like, 0.1)
        return (torch.equal(noise, expected) and torch.equal(kept, expected_kept)
                and torch.equal(torch.get_rng_state(), expected_state))


@functools.cache
def vectorised_draw() -> Optional[Draw]:
    """`compiled_draw`, once it has reproduced torch's kernel in this process; None where it cannot be built or
    does not reproduce torch."""
    if ctypes.sizeof(_GeneratorState) != torch.get_rng_state().numel():
        return None
    draw = compiled_draw()
    return draw if draw is not None and _reproduces_torch(draw) else None


def dropout_draws(like: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """`torch_noise_and_mask(like, p)`, value for value and with the same draws from torch's default CPU
    generator: by `vectorised_draw` for a contiguous float32 CPU tensor where it reproduces torch, else by torch."""
    if like.device.type == "cpu" and like.dtype == torch.float32 and like.is_contiguous():
        draw = vectorised_draw()
        if draw is not None:
            return draw(like, p)
    return torch_noise_and_mask(like, p)
