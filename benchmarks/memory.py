"""Peak GPU memory of a TransDiff training step, predicted by torch's memory tracker on fake tensors
(`util/execution/memory.py`), and the CPU measurement that checks the method.

    python benchmarks/memory.py --model transdiff_large --batch_size 32 --world 8 --zero1      # seconds
    python benchmarks/memory.py --table                                  # docs/gpu.md's tables (minutes)
    python benchmarks/memory.py --check --model transdiff_base --batch_size 4 --precision fp32  # a real CPU step
    python benchmarks/memory.py --check --device cuda --model transdiff_base --batch_size 16   # benchmarks/gpu.sh

A prediction is the peak per GPU of a DDP run of `--world` ranks (1: one GPU, no DDP) with CUDA's attention and
dropout kernels, nothing allocated. `--table` prints docs/gpu.md's tables: TransDiff-B, -L and -H at the README's
batches in bf16 over 8 ranks, plain, with every block checkpointed and with ZeRO-1, and the largest batch that
fits a 40 GB and an 80 GB GPU with the margin of `util.execution.memory.fits`. `--check` runs the step for real
(a world of one) and compares the allocator's peak with the prediction for the same step with the device's
kernels: on the CPU the CPU allocator's count under torch's profiler (and the process's resident peak), on a
CUDA GPU the caching allocator's allocated and reserved peaks. Not a test: a check allocates what its
prediction says, and more (docs/gpu.md, "Memory").
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import cache
from pathlib import Path
from typing import Callable, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from main import freeze_untrained  # noqa: E402
from models.transdiff import TRANSDIFF_MODELS  # noqa: E402
from util.errors import run_cli  # noqa: E402
from util.execution.memory import (  # noqa: E402
    KERNELS,
    PRECISIONS,
    fits,
    largest_batch,
    measure_step_memory,
    predict_step_memory,
)
from util.pretrained import build_model, default_settings  # noqa: E402

GIB = 2 ** 30
# Memory of the GPUs the table is for, as nvidia-smi reports it: A100 40GB (40,960 MiB) and H100 80GB (81,559 MiB,
# the smaller of the 80 GB parts).
GPU_MEMORY = {"40 GB": 40_960 * 2 ** 20, "80 GB": 81_559 * 2 ** 20}
TABLE_MODELS = ("transdiff_base", "transdiff_large", "transdiff_huge")
TABLE_WORLD = 8  # one node of 8 GPUs


class Run(NamedTuple):
    """A training run of the README: its model flags ((name, value) pairs, hashable for `predicted_peak`'s cache),
    per-GPU batch, `diffusion_batch_mul`, frozen encoder."""

    label: str
    flags: tuple
    batch: int
    mul: int
    only_train_diff: bool = False


README_RUNS = (
    Run("1-step, 256 px", (), 32, 4),
    Run("MRAR, 256 px", (("mrar", True), ("patch_size", 2)), 16, 2),
    Run("512 px, decoder only", (("img_size", 512),), 16, 4, only_train_diff=True),
)
# The table's columns: (grad_checkpointing, zero1), with DDP over TABLE_WORLD ranks.
TABLE_SETUPS = {"DDP": (False, False), "all blocks checkpointed": (True, False),
                f"ZeRO-1 over {TABLE_WORLD}": (False, True), "both": (True, True)}


def model_builder(model: str, flags: dict, only_train_diff: bool) -> Callable[[], torch.nn.Module]:
    """The model main.py builds from these flags (the others at main.py's defaults), `--only_train_diff` applied."""
    settings = default_settings() | {"model": model} | flags
    return lambda: freeze_untrained(build_model(settings), only_train_diff)


def gib(size: int, digits: int = 2) -> str:
    return f"{size / GIB:.{digits}f}"


@cache
def predicted_peak(model: str, run: Run, batch: int, checkpointing: bool, world: int, zero1: bool) -> int:
    """The predicted peak of `run` at `batch` (bf16, CUDA kernels), cached: the tables ask for some twice."""
    flags = dict(run.flags) | {"diffusion_batch_mul": run.mul, "grad_checkpointing": checkpointing}
    return predict_step_memory(model_builder(model, flags, run.only_train_diff), batch, "bf16", world=world,
                               zero1=zero1).peak


def cell(peak: int) -> str:
    """A peak in GiB: in bold where it does not fit the 80 GB GPU with the margin, in italics the 40 GB one."""
    text = gib(peak, digits=1)
    if not fits(peak, GPU_MEMORY["80 GB"]):
        return f"**{text}**"
    return text if fits(peak, GPU_MEMORY["40 GB"]) else f"*{text}*"


def print_peak_table() -> None:
    """The README's runs, per GPU, in each of `TABLE_SETUPS`."""
    print("| model | run | batch x mul | " + " | ".join(TABLE_SETUPS) + " |")
    print("|---|---|---|" + "---|" * len(TABLE_SETUPS))
    for model in TABLE_MODELS:
        for run in README_RUNS:
            peaks = [predicted_peak(model, run, run.batch, checkpointing, TABLE_WORLD, zero1)
                     for checkpointing, zero1 in TABLE_SETUPS.values()]
            print(f"| {model} | {run.label} | {run.batch} x {run.mul} | " + " | ".join(map(cell, peaks)) + " |",
                  flush=True)


def print_largest_batches() -> None:
    """The largest per-GPU batch of the 1-step run at 256 px (diffusion_batch_mul 4) that fits each GPU."""
    run = README_RUNS[0]
    setups = {"DDP": (False, False), "checkpointed + ZeRO-1": (True, True)}
    columns = [f"{name}, {gpu}" for gpu in GPU_MEMORY for name in setups]
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for model in TABLE_MODELS:
        batches = [largest_batch(lambda batch: predicted_peak(model, run, batch, checkpointing, TABLE_WORLD, zero1),
                                 size)
                   for size in GPU_MEMORY.values() for checkpointing, zero1 in setups.values()]
        print(f"| {model} | " + " | ".join(str(batch) for batch in batches) + " |", flush=True)


def print_tables() -> None:
    started = time.time()
    print(f"Predicted peak per GPU (GiB), bf16, DDP over {TABLE_WORLD} ranks; with the margin, italics do not fit "
          "40 GB, bold not 80 GB\n")
    print_peak_table()
    print(f"\nLargest per-GPU batch, 1-step 256 px, diffusion_batch_mul {README_RUNS[0].mul}, bf16, DDP over "
          f"{TABLE_WORLD} ranks, with the margin\n")
    print_largest_batches()
    print(f"\ntook {(time.time() - started) / 60:.1f} min")


def process_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def difference(predicted: int, measured: int) -> str:
    return f"{predicted / measured - 1:+.2%}"


def check(args, build: Callable[[], torch.nn.Module]) -> None:
    """The step run for real on `--device` (a world of one) against its prediction with that device's kernels."""
    device = torch.device(args.device)
    before = process_bytes("VmRSS")
    started = time.time()
    measured = measure_step_memory(build, args.batch_size, args.precision, device)
    seconds = time.time() - started
    process_peak = process_bytes("VmHWM") - before
    predicted = predict_step_memory(build, args.batch_size, args.precision, world=1, kernels=device.type)
    print(f"{args.model}, batch {args.batch_size} x {args.diffusion_batch_mul}, {args.precision}, grad_checkpointing "
          f"{args.grad_checkpointing}, on {device.type} ({torch.get_num_threads()} thread(s)); two real steps took "
          f"{seconds:.0f} s")
    print(f"predicted peak (MemTracker, fake tensors, {device.type} kernels): {gib(predicted.peak)} GiB "
          f"({predicted.peak:,} B), resident {gib(predicted.resident)} GiB")
    print(f"measured peak (the {device.type} allocator): {gib(measured.peak)} GiB ({measured.peak:,} B), resident "
          f"{gib(measured.resident)} GiB; prediction {difference(predicted.peak, measured.peak)}")
    if measured.reserved is not None:
        print(f"measured reserved peak (the caching allocator): {gib(measured.reserved)} GiB; reserved / allocated "
              f"{measured.reserved / measured.peak:.3f}")
    else:
        print(f"measured process peak (VmHWM - VmRSS before): {gib(process_peak)} GiB; prediction "
              f"{difference(predicted.peak, process_peak)}")


def predict(args, build: Callable[[], torch.nn.Module]) -> None:
    memory = predict_step_memory(build, args.batch_size, args.precision, world=args.world, zero1=args.zero1,
                                 kernels=args.kernels)
    print(f"{args.model}, batch {args.batch_size} x {args.diffusion_batch_mul}, {args.precision}, "
          f"{args.kernels} kernels, world {args.world}{', ZeRO-1' if args.zero1 else ''}, grad_checkpointing "
          f"{args.grad_checkpointing}")
    print(f"predicted peak: {gib(memory.peak)} GiB; resident between steps {gib(memory.resident)} GiB")
    print("at the peak (GiB; Parameter: the weights and the EMA's): "
          + ", ".join(f"{kind} {gib(size)}" for kind, size in memory.at_peak.items() if size))
    print("fits with the margin: " + ", ".join(f"{gpu} {'yes' if fits(memory.peak, size) else 'no'}"
                                               for gpu, size in GPU_MEMORY.items()))


def run(args) -> None:
    torch.set_num_threads(args.threads)
    if args.table:
        return print_tables()
    if args.check and (args.world != 1 or args.zero1):
        raise ValueError("--check runs one process: a world of one, without --zero1")
    flags = {"img_size": args.img_size, "vae_stride": args.vae_stride, "vae_embed_dim": args.vae_embed_dim,
             "patch_size": args.patch_size, "mrar": args.mrar, "diffusion_batch_mul": args.diffusion_batch_mul,
             "grad_checkpointing": args.grad_checkpointing}
    build = model_builder(args.model, flags, args.only_train_diff)
    (check if args.check else predict)(args, build)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print docs/gpu.md's tables (the other flags unused)")
    parser.add_argument("--check", action="store_true",
                        help="run the step for real on --device (a world of one) and compare the allocator's peak\n"
                             "with the prediction for that device's kernels")
    parser.add_argument("--model", default="transdiff_base", choices=sorted(TRANSDIFF_MODELS))
    parser.add_argument("--img_size", default=256, type=int)
    parser.add_argument("--vae_stride", default=16, type=int)
    parser.add_argument("--vae_embed_dim", default=16, type=int)
    parser.add_argument("--patch_size", default=1, type=int)
    parser.add_argument("--mrar", action="store_true")
    parser.add_argument("--only_train_diff", action="store_true", help="freeze everything but the decoder")
    parser.add_argument("--batch_size", default=32, type=int, help="samples per GPU")
    parser.add_argument("--diffusion_batch_mul", default=4, type=int)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS, help="bf16 autocast or none")
    parser.add_argument("--grad_checkpointing", nargs="?", const=True, default=False, type=int, metavar="N",
                        help="every block (the flag alone) or the first N of the encoder and of the decoder")
    parser.add_argument("--world", default=1, type=int, help="DDP ranks (1: one GPU, no DDP)")
    parser.add_argument("--zero1", action="store_true", help="ZeRO-1 over the --world ranks")
    parser.add_argument("--kernels", default="cuda", choices=KERNELS,
                        help="whose attention and dropout kernels a prediction assumes (--check: the device's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where --check runs the step")
    parser.add_argument("--threads", default=1, type=int, help="torch threads (--check)")
    return parser


if __name__ == "__main__":
    run_cli("memory.py", lambda: run(get_args_parser().parse_args()))
