"""Two executions of TransDiff side by side: training and sampling throughput, peak memory, output difference.

    python benchmarks/compare.py              # faithful vs eager, TransDiff-B, CPU, 1 thread (20-30 min, 2 cores)
    python benchmarks/compare.py --model transdiff_tiny --img_size 32 --vae_stride 2 --rounds 1    # seconds
    bash benchmarks/gpu.sh                    # eager vs compiled, TransDiff-B and -L, CUDA, bf16

The executions (`VARIANTS`, chosen with `--pair A,B`):

* `faithful`: the original's way: the condition projected for every diffusion copy in training and, in sampling,
  the encoder once per image and the condition's keys/values again at every step (`tests/support/reference.py`); AdamW
  with torch's default implementation for the device (a per-parameter loop on CPU); a per-parameter EMA loop.
* `eager`: this project's default: keys/values once per sample and shared by its copies, the encoder once per
  distinct label and the keys/values once per condition in sampling, `util.optim.build_optimizer` (fused AdamW),
  the multi-tensor EMA update.
* `compiled`: `eager` with `--compile` (every encoder and decoder block compiled, `util.execution.wrap`).
* `checkpointed`: `compiled` with `--grad_checkpointing` (blocks recompute their activations in the backward pass).

Each measurement runs in a process of its own, so that its peak memory is its own, and the two executions
alternate round by round, so that a change in the machine's load hits both. The processes share the seeds: the
same random weights, latents, labels and noise.

* Training: `--train_batch` samples x `diffusion_batch_mul` 4, dropout 0.1, `--precision`, one AdamW step
  (grad clip 3) and one EMA update per step. One warm-up step (which compiles), then `--train_steps` timed steps.
  Peak memory over the timed steps: the resident set (VmHWM, reset after the warm-up) on CPU, the allocator's
  peak on CUDA.
* Sampling: Euler-Maruyama, cfg 1.5, each batch of `--sample_batches`. The time per image at 100 steps is the
  once-per-image part plus 100 x the per-step cost timed over `--sample_steps` steps. Both executions save their
  latents; the report gives the largest absolute difference between them.

Prints a table (first execution, second, ratio) and ends with the line
`ratios: train_speed X train_memory Y sample_speed Z` (speed: second / first in images per second, sampling as
the geometric mean over the batch sizes; memory: second / first peak). Not a test: only ratios measured in one
run mean anything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DIFFUSION_BATCH_MUL = 4
DROPOUT = 0.1
SAMPLE_CFG = 1.5
REPORTED_STEPS = 100  # sampling time per image is quoted at the paper's 100 steps
SEED = 0


class Variant(NamedTuple):
    shared_work: bool          # TransDiff's shared keys/values and label conditions, else tests/support/reference.py
    compiled: bool             # util.execution.compile_blocks
    project_optimizer: bool    # build_optimizer and EMA.update, else torch's default AdamW and a per-parameter EMA
    grad_checkpointing: bool


VARIANTS = {
    "faithful": Variant(shared_work=False, compiled=False, project_optimizer=False, grad_checkpointing=False),
    "eager": Variant(shared_work=True, compiled=False, project_optimizer=True, grad_checkpointing=False),
    "compiled": Variant(shared_work=True, compiled=True, project_optimizer=True, grad_checkpointing=False),
    "checkpointed": Variant(shared_work=True, compiled=True, project_optimizer=True, grad_checkpointing=True),
}


class Meter:
    """Wall time and peak memory on one device (CUDA: synchronised, allocator peak; CPU: VmHWM)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def now(self) -> float:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def model_builder(args, **overrides):
    """The benchmarked model's constructor (random weights, dropout as in training)."""
    from models.transdiff import TRANSDIFF_MODELS

    return lambda: TRANSDIFF_MODELS[args.model](img_size=args.img_size, vae_stride=args.vae_stride,
                                                vae_embed_dim=args.vae_embed_dim, class_num=1000,
                                                attn_dropout=DROPOUT, proj_dropout=DROPOUT, **overrides)


def build_model(args, device, **overrides):
    import torch

    torch.manual_seed(SEED)
    model = model_builder(args, **overrides)().to(device)
    # The zero-initialised output layer would make every velocity 0, every sample the same noise process in both
    # executions, and their comparison vacuous: small random weights, as a trained network has.
    torch.nn.init.normal_(model.diffdecoder.net.final_layer.linear.weight, std=0.02)
    return model


def model_flops(images_per_second: float, flops_per_image: float, device, precision: str) -> dict:
    """The model FLOP/s that a rate means, and its utilisation of a known GPU's peak (`util.execution.flops`)."""
    from util.execution.flops import Throughput, peak_flops

    rate = Throughput.of(1, 1 / images_per_second, flops_per_image, peak_flops(device, precision, tf32=False))
    return {"flops_per_image": flops_per_image, "tflops": rate.flops_per_second / 1e12, "mfu": rate.mfu}


def autocast(args, device):
    import torch

    if args.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)


# ------------------------------------------------------------------------------------------------ workers
def train_worker(args, variant: Variant, device) -> dict:
    import torch

    from tests.support.reference import per_copy_forward_loss
    from util.execution.flops import training_flops_per_image
    from util.execution.wrap import wrap_model
    from util.optim import EMA, build_optimizer, param_groups_weight_decay

    model = build_model(args, device, diffusion_batch_mul=DIFFUSION_BATCH_MUL,
                        grad_checkpointing=variant.grad_checkpointing).train()
    if not variant.shared_work:
        model.forward_loss = lambda *a, **k: per_copy_forward_loss(model, *a, **k)
    if variant.project_optimizer:
        optimizer = build_optimizer(model, 1e-4, 0.02, device_type=device.type)
    else:
        optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.02)[0], lr=1e-4, betas=(0.9, 0.95))
    ema = EMA(model)
    execution = wrap_model(model, device, compile=variant.compiled)
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(args.train_batch, model.vae_embed_dim, model.latent_size, model.latent_size,
                          generator=generator).to(device)  # [B, C, h, w]
    labels = torch.randint(0, 1000, (args.train_batch,), generator=generator).to(device)

    def step():
        with autocast(args, device):
            loss = execution.train_module(latents, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if variant.project_optimizer:
            ema.update(model, 0.9999)
        else:
            with torch.no_grad():  # the original's per-parameter EMA loop
                for ema_param, param in zip(ema.module.parameters(), model.parameters()):
                    ema_param.mul_(0.9999).add_(param.detach(), alpha=1 - 0.9999)
        return loss.item()

    meter = Meter(device)
    started = meter.now()
    step()
    warmup = meter.now() - started
    meter.reset_peak()
    started = meter.now()
    losses = [step() for _ in range(args.train_steps)]
    seconds = (meter.now() - started) / args.train_steps
    flops = training_flops_per_image(model_builder(args, diffusion_batch_mul=DIFFUSION_BATCH_MUL))
    return {"images_per_second": args.train_batch / seconds, "seconds_per_step": seconds,
            "warmup_seconds": warmup, "peak_bytes": meter.peak_bytes(), "losses": losses,
            **model_flops(args.train_batch / seconds, flops, device, args.precision)}


def sample_worker(args, variant: Variant, device, batch: int, latents_path: str) -> dict:
    import torch

    from models.noise import TorchNoise
    from tests.support.reference import per_image_samples
    from util.execution.flops import sampling_flops_per_image
    from util.execution.wrap import compile_blocks

    model = build_model(args, device).eval()
    if variant.compiled:
        compile_blocks(model)
    labels = (torch.arange(batch) * 7 % 1000).to(device)
    noise = torch.randn(batch, model.diff_seqlen, model.decoder_token_dim,
                        generator=torch.Generator().manual_seed(SEED)).to(device)  # [B, N, C]

    def sample(steps):
        source = TorchNoise(torch.Generator(device).manual_seed(SEED + 1))
        if variant.shared_work:
            return model.samples(labels, steps, cfg=SAMPLE_CFG, sampler="maruyama", noise=noise, generator=source)
        return per_image_samples(model, labels, steps, SAMPLE_CFG, "maruyama", noise, source)[-1]

    def condition():
        if variant.shared_work:
            return model.label_condition(labels, guided=True)
        embedding = torch.cat([model.class_emb(labels), model.unconditional_embedding(batch)])  # [2B, D]
        return model.forward_encoder(None, embedding)

    meter = Meter(device)
    with torch.no_grad(), autocast(args, device):
        sample(2)  # warm-up (and compilation)
        meter.reset_peak()
        started = meter.now()
        condition()
        once = meter.now() - started
        started = meter.now()
        latents = sample(args.sample_steps)
        total = meter.now() - started
    per_step = (total - once) / args.sample_steps
    seconds_per_image = (once + REPORTED_STEPS * per_step) / batch
    torch.save(latents.float().cpu(), latents_path)
    once_flops, step_flops = sampling_flops_per_image(model_builder(args))
    flops = once_flops + REPORTED_STEPS * step_flops
    return {**model_flops(1 / seconds_per_image, flops, device, args.precision),
            "images_per_second": 1 / seconds_per_image, "seconds_per_image": seconds_per_image,
            "once_seconds": once, "step_seconds": per_step, "peak_bytes": meter.peak_bytes()}


def run_worker(args) -> None:
    import torch

    from util.distributed import resolve_device_type

    torch.set_num_threads(args.threads)
    device = torch.device(resolve_device_type(args.device))
    variant = VARIANTS[args.variant]
    if args.worker == "train":
        result = train_worker(args, variant, device)
    else:
        result = sample_worker(args, variant, device, int(args.worker.removeprefix("sample")), args.latents)
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver
def forwarded_flags(args) -> list[str]:
    return ["--model", args.model, "--img_size", str(args.img_size), "--vae_stride", str(args.vae_stride),
            "--vae_embed_dim", str(args.vae_embed_dim), "--threads", str(args.threads), "--device", args.device,
            "--precision", args.precision, "--train_batch", str(args.train_batch),
            "--train_steps", str(args.train_steps), "--sample_steps", str(args.sample_steps)]


def spawn(args, worker: str, variant: str, tmp: str) -> dict:
    """Run one measurement in a new process; the compiler cache starts empty in each run of the driver, so the
    first round's first step shows the compilation time."""
    latents = os.path.join(tmp, f"{worker}-{variant}.pt")
    command = [sys.executable, __file__, "--worker", worker, "--variant", variant, "--latents", latents,
               *forwarded_flags(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor-cache")}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{worker} {variant} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def flops_cell(results: list[dict]) -> str:
    """The best round's model TFLOP/s, with its MFU where the device's peak is known."""
    top = max(results, key=lambda r: r["tflops"])
    return f"{top['tflops']:.4g}" + (f" ({top['mfu']:.1%})" if top["mfu"] is not None else "")


def mfu_note(a: list[dict], b: list[dict]) -> str:
    return " (MFU)" if a[0]["mfu"] is not None else ""


def best(results: list[dict], key: str, higher: bool = True) -> float:
    """The best value of `key` over the rounds (speed: the round least disturbed by the machine's load)."""
    values = [r[key] for r in results]
    return max(values) if higher else min(values)


def drive(args) -> None:
    import torch

    first, second = args.pair.split(",")
    batches = [int(b) for b in args.sample_batches.split(",") if b]
    workloads = (["train"] if args.train_steps else []) + [f"sample{batch}" for batch in batches]
    results = {(w, v): [] for w in workloads for v in (first, second)}
    deviation = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for workload in workloads:
                for variant in (first, second):
                    results[workload, variant].append(spawn(args, workload, variant, tmp))
                    print(f"round {round_index + 1} {workload} {variant}: {results[workload, variant][-1]} "
                          f"({(time.time() - started) / 60:.1f} min)", flush=True)
                if workload.startswith("sample"):
                    a, b = (torch.load(os.path.join(tmp, f"{workload}-{v}.pt"), weights_only=True)
                            for v in (first, second))
                    deviation[workload] = max(deviation.get(workload, 0.0), (a - b).abs().max().item())
    print(f"\n{args.model}, {args.img_size} px, {args.device} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{args.precision}, {args.threads} thread(s), best of {args.rounds} round(s); {first} vs {second}\n")
    print(f"| workload | {first} | {second} | {second} / {first} |\n|---|---|---|---|")
    ratios = {}
    if "train" in workloads:
        a, b = results["train", first], results["train", second]
        speed = best(b, "images_per_second") / best(a, "images_per_second")
        memory = best(b, "peak_bytes", higher=False) / best(a, "peak_bytes", higher=False)
        print(f"| training, batch {args.train_batch} x mul {DIFFUSION_BATCH_MUL}: images/s | "
              f"{best(a, 'images_per_second'):.4g} | {best(b, 'images_per_second'):.4g} | {speed:.2f} |")
        print(f"| training peak memory (GiB) | {best(a, 'peak_bytes', False) / 2**30:.2f} | "
              f"{best(b, 'peak_bytes', False) / 2**30:.2f} | {memory:.2f} |")
        print(f"| training first step, compilation included (s) | {a[0]['warmup_seconds']:.1f} | "
              f"{b[0]['warmup_seconds']:.1f} | |")
        print(f"| training: model TFLOP/s{mfu_note(a, b)} | {flops_cell(a)} | {flops_cell(b)} | |")
        ratios.update(train_speed=speed, train_memory=memory)
    sample_speeds = []
    for batch in batches:
        a, b = results[f"sample{batch}", first], results[f"sample{batch}", second]
        speed = best(b, "images_per_second") / best(a, "images_per_second")
        sample_speeds.append(speed)
        print(f"| sampling, batch {batch}, cfg {SAMPLE_CFG}, {REPORTED_STEPS} steps: images/s | "
              f"{best(a, 'images_per_second'):.4g} | {best(b, 'images_per_second'):.4g} | {speed:.2f} |")
        print(f"| sampling, batch {batch}: max abs latent difference | | {deviation[f'sample{batch}']:.1e} | |")
        print(f"| sampling, batch {batch}: model TFLOP/s{mfu_note(a, b)} | {flops_cell(a)} | {flops_cell(b)} | |")
    if sample_speeds:
        ratios["sample_speed"] = math.prod(sample_speeds) ** (1 / len(sample_speeds))
    print(f"\ntook {(time.time() - started) / 60:.1f} min")
    print("ratios: " + " ".join(f"{key} {value:.2f}" for key, value in ratios.items()))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="faithful,eager", help=f"two of {', '.join(VARIANTS)}: first,second")
    parser.add_argument("--model", default="transdiff_base")
    parser.add_argument("--img_size", default=256, type=int)
    parser.add_argument("--vae_stride", default=16, type=int)
    parser.add_argument("--vae_embed_dim", default=16, type=int)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype")
    parser.add_argument("--threads", default=1, type=int, help="torch threads per process")
    parser.add_argument("--rounds", default=2, type=int, help="alternations of the two executions per workload")
    parser.add_argument("--train_batch", default=2, type=int)
    parser.add_argument("--train_steps", default=2, type=int, help="timed training steps per process (0: skip)")
    parser.add_argument("--sample_batches", default="1,4", help="comma-separated sampling batch sizes ('': skip)")
    parser.add_argument("--sample_steps", default=20, type=int, help="timed sampling steps per process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--latents", default="", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    for name in arguments.pair.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"compare.py: error: --pair: unknown execution {name!r}; "
                             f"choose from {', '.join(VARIANTS)}")
    run_worker(arguments) if arguments.worker else drive(arguments)
