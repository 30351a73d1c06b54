"""End-to-end run helpers: tiny-model flags, a generated image folder, and `main.py` / `main_cache.py` runs
(forked from the preloading server, or torchrun with CPU processes)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.support import REPO_ROOT, preloaded
from util.checkpoint import load_checkpoint

CLASSES = ("ants", "bees", "cats")
IMAGES_PER_CLASS = 8
TINY = ("--model transdiff_tiny --tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --class_num 3 "
        "--buffer_size 4 --device cpu --num_workers 0 --batch_size 4 --blr 1e-3 --warmup_epochs 1 "
        "--diffusion_batch_mul 2 --save_last_freq 1 --ema_rate 0.9").split()
EVAL = "--evaluate --num_images 24 --eval_bsz 4 --num_sampling_steps 4 --cfg 1.5".split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def write_image_folder(root: Path, size: int = 20) -> Path:
    """<root>/train/<class>/<i>.png: class-coloured noisy squares (not square-cropped: 20x24 px)."""
    rng = np.random.RandomState(0)
    for c, name in enumerate(CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            base = np.zeros((size, size + 4, 3))
            base[..., c] = 200
            pixels = np.clip(base + rng.randint(0, 56, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run(args, nproc=1, check=True, script="main.py", timeout=300):
    """Run `script` (`python script`, forked from the preloading server, or torchrun with `nproc` CPU processes)
    and return the CompletedProcess."""
    if nproc == 1:
        result = preloaded.run([script, *map(str, args)], ENV, timeout)
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        result = subprocess.run([*torchrun, script, *map(str, args)], cwd=REPO_ROOT, env=ENV, capture_output=True,
                                text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nSTDOUT\n{result.stdout[-4000:]}\n"
                             f"STDERR\n{result.stderr[-4000:]}")
    return result


def load_state(path):
    return load_checkpoint(str(path))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def eval_folder(output_dir):
    folders = [p for p in Path(output_dir).iterdir() if p.is_dir() and p.name.endswith("_evaluate")]
    assert len(folders) == 1, folders
    return folders[0]
