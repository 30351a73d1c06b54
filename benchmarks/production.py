"""What a user gets: `main.py` itself, through torchrun, timed by its own progress lines.

    python benchmarks/production.py --model transdiff_base --device cuda          # one GPU (benchmarks/gpu.sh)
    python benchmarks/production.py --model transdiff_tiny --tokenizer pixel --img_size 16 --vae_stride 2 \
        --vae_embed_dim 12 --device cpu --batch_size 4 --steps 3 --eval_images 8 --eval_bsz 4 --sampling_steps 2

Unlike `compare.py`, which times the model alone, this runs the whole training path (the image loader with its
workers, the tokenizer's encode, the 1-rank DDP wrap, the loss read every 20 steps, AdamW, the EMA) and the
whole evaluation path (per-image noise, sampling, the VAE decode, the PNG writers) on a synthetic image folder
and, for `kl16`, a randomly initialised KL-16 VAE. It prints the training images/s, model TFLOP/s and MFU of the
progress lines after the first (which holds the start-up), and the evaluation's seconds per image after its
first batch.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from models.vae import AutoencoderKL  # noqa: E402

CLASSES = 8  # a divisor of the evaluation image counts


def write_images(root: Path, count: int, size: int) -> None:
    """`count` noise images of `size` px in CLASSES class folders under `root/train`."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / "train" / f"class{index % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")


def write_random_vae(path: Path) -> None:
    """A randomly initialised KL-16 VAE in MAR's checkpoint format ({'model': state_dict})."""
    torch.save({"model": AutoencoderKL(embed_dim=16).state_dict()}, path)


def torchrun(argv: list[str], log: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "main.py", *argv]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"production.py: main.py failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return log.read_text()


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = args.batch_size * args.steps
        write_images(tmp / "data", images, args.img_size)
        model = ["--model", args.model, "--img_size", str(args.img_size), "--tokenizer", args.tokenizer,
                 "--vae_stride", str(args.vae_stride), "--vae_embed_dim", str(args.vae_embed_dim),
                 "--class_num", str(CLASSES), "--device", args.device, "--precision", args.precision,
                 *(["--compile"] if args.compile else [])]
        if args.tokenizer == "kl16":
            write_random_vae(tmp / "kl16.ckpt")
            model += ["--vae_path", str(tmp / "kl16.ckpt")]
        training = torchrun([*model, "--data_path", str(tmp / "data"), "--output_dir", str(tmp / "train"),
                             "--epochs", "1", "--batch_size", str(args.batch_size), "--diffusion_batch_mul", "4",
                             "--num_workers", str(args.num_workers), "--preview_freq", "0", "--blr", "1e-4"],
                            tmp / "train" / "log.txt")
        windows = re.findall(r"img/s: (\S+)\s+tflop/s: (\S+)(?:\s+mfu: (\S+)%)?", training)[1:]
        evaluation = torchrun([*model, "--output_dir", str(tmp / "eval"), "--evaluate", "--allow_random_weights",
                               "--num_images", str(args.eval_images), "--eval_bsz", str(args.eval_bsz),
                               "--num_sampling_steps", str(args.sampling_steps), "--metrics", ""],
                              tmp / "eval" / "log.txt")
    seconds = re.findall(r"rank 0: (\S+) s per image", evaluation)
    print(f"{args.model}, {args.img_size} px, {args.device}, {args.precision}, tokenizer {args.tokenizer}")
    if windows:
        rates = [float(w[0]) for w in windows]
        flops = [float(w[1]) for w in windows]
        mfu = [float(w[2]) for w in windows if w[2]]
        print(f"training, batch {args.batch_size} x mul 4 per GPU, {len(windows)} window(s) after the first: "
              f"{np.mean(rates):.4g} images/s, {np.mean(flops):.4g} model TFLOP/s"
              + (f", MFU {np.mean(mfu):.1f}%" if mfu else ""))
    else:
        print("training: no progress line after the first; raise --steps above 20")
    if seconds:
        print(f"evaluation, batch {args.eval_bsz}, {args.sampling_steps} steps: {float(seconds[0]):.4g} s per image "
              f"({1 / float(seconds[0]):.4g} images/s), VAE decode and PNGs included")
    else:
        print("evaluation: one batch only (its time holds the warm-up); raise --eval_images")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="transdiff_base")
    parser.add_argument("--img_size", default=256, type=int)
    parser.add_argument("--tokenizer", default="kl16", choices=("kl16", "pixel"))
    parser.add_argument("--vae_stride", default=16, type=int)
    parser.add_argument("--vae_embed_dim", default=16, type=int)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch_size", default=32, type=int, help="training images per step")
    parser.add_argument("--steps", default=61, type=int, help="training steps (progress lines at 0, 20, 40, 60)")
    parser.add_argument("--num_workers", default=8, type=int)
    parser.add_argument("--eval_images", default=512, type=int)
    parser.add_argument("--eval_bsz", default=256, type=int)
    parser.add_argument("--sampling_steps", default=100, type=int)
    return parser


if __name__ == "__main__":
    main()
