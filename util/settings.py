"""The command line of `main.py` and `main_cache.py`: flags, presets and validation.

`get_args_parser()` defines the flags (groups shared with `main_cache.py` are built by `add_*_args`);
`resolve_args(args)` is the settings step, the only code that writes into `args`: it applies the preset,
decides the device, derives the absolute learning rate and rejects inconsistent combinations with a
`SettingsError` that says what to change. Choices come from the registries (`TRANSDIFF_MODELS`,
`SAMPLERS`, `TOKENIZERS`, `SAMPLING_PRESETS`, `EVAL_METRICS`), never from lists kept here.
"""
import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

from models.samplers import DEFAULT_SAMPLER, SAMPLERS
from models.tokenizers import TOKENIZERS, check_tokenizer_settings
from models.transdiff import TRANSDIFF_MODELS
from util import distributed as dist
from util.eval.registry import DEFAULT_METRICS, EVAL_METRICS
from util.execution.precision import PRECISIONS, resolve_precision
from util.lr_sched import SCHEDULES, absolute_lr
from util.presets import SAMPLING_PRESETS, apply_preset

# Flags of the original (inherited from MAR) that change nothing here. They are accepted so that the
# published commands keep working; each is listed in `--help` as a no-op.
LEGACY_NO_OP_FLAGS = {
    "num_iter": (64, int, "MAR's number of AR iterations; TransDiff's encoder runs once per stage"),
    "temperature": (1.0, float, "MAR's diffusion-loss temperature; unused by the flow-matching sampler"),
    "cfg_schedule": ("linear", str, "MAR's cfg schedule; TransDiff applies a constant cfg (per MRAR stage with "
                                    "--cfg a,b,c,d)"),
    "world_size": (1, int, "the launcher's environment (torchrun, srun, mpirun) gives the world size"),
    "local_rank": (-1, int, "the launcher's environment (LOCAL_RANK) gives the local rank"),
}


# The range of every number flag that has one, inclusive: (lowest, highest), None for no bound on that side.
# Every float setting is refused when it is not finite, whether or not it is listed here (`check_numbers`).
NUMBER_RANGES = {
    "img_size": (1, None), "vae_embed_dim": (1, None), "vae_stride": (1, None), "patch_size": (1, None),
    "class_num": (1, None), "buffer_size": (1, None), "diffusion_batch_mul": (1, None), "num_workers": (0, None),
    "label_drop_prob": (0.0, 1.0), "attn_dropout": (0.0, 1.0), "proj_dropout": (0.0, 1.0),
    "batch_size": (1, None), "gradient_accumulation_steps": (1, None), "epochs": (0, None), "start_epoch": (0, None),
    "min_lr": (0.0, None), "warmup_epochs": (0.0, None), "weight_decay": (0.0, None), "grad_clip": (0.0, None),
    "ema_rate": (0.0, 1.0), "seed": (0, 2**31 - 1),  # each rank seeds numpy with seed + rank, below 2**32
    "num_sampling_steps": (1, None), "scale_1": (0.0, None),
    "num_images": (1, None), "eval_bsz": (1, None), "eval_freq": (1, None),
    "preview_freq": (0, None), "preview_classes": (1, None), "preview_per_class": (1, None), "preview_steps": (1, None),
    "save_last_freq": (1, None), "save_every_steps": (0, None), "save_every_minutes": (0.0, None),
}
POSITIVE_NUMBERS = ("lr", "blr", "peak_tflops", "dist_timeout")  # > 0 when given


class HelpFormatter(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with the line breaks of the help texts and every flag's default; a default of None derived from
    other settings is the one the help text states in words."""

    def _get_help_string(self, action):
        if action.default is None and "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class SettingsError(ValueError):
    """An inconsistent combination of flags; the message says what to change."""


def check_numbers(settings: Mapping[str, Any]) -> None:
    """Refuse every float setting that is not finite (lists included, e.g. a per-stage --cfg) and every number
    outside its range (`NUMBER_RANGES`, `POSITIVE_NUMBERS`); `settings` maps flag names to values, and names a
    parser does not have are skipped."""
    for name, value in settings.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise SettingsError(f"--{name} {_shown(value)}: must be a finite number")
    for name, (lowest, highest) in NUMBER_RANGES.items():
        value = settings.get(name)
        if value is None:
            continue
        if highest is None and value < lowest:
            raise SettingsError(f"--{name} {value}: must be >= {lowest}")
        if highest is not None and not lowest <= value <= highest:
            raise SettingsError(f"--{name} {value}: must be in [{lowest}, {highest}]")
    for name in POSITIVE_NUMBERS:
        value = settings.get(name)
        if value is not None and value <= 0:
            raise SettingsError(f"--{name} {value}: must be > 0")


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _cfg_list(text):
    """'1.3' -> 1.3; '1.0,1.2,1.3,1.5' -> [1.0, 1.2, 1.3, 1.5] (one per MRAR stage)."""
    values = [float(v) for v in str(text).split(",")]
    return values[0] if len(values) == 1 else values


def _interval(text):
    """'0.1,0.8' -> (0.1, 0.8)."""
    values = tuple(float(v) for v in str(text).split(","))
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 <= LO <= HI <= 1, got {text!r}")
    return values


def _name_list(text):
    return [name for name in str(text).split(",") if name]


def add_tokenizer_args(parser):
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer", default="kl16", choices=sorted(TOKENIZERS),
                       help="kl16: MAR's KL-16 VAE (weights from --vae_path); pixel: parameter-free space-to-depth")
    group.add_argument("--vae_path", default="ckpt/vae/kl16.ckpt",
                       help="MAR's KL-16 weights (tools/download.py kl16 puts them here)")
    group.add_argument("--vae_embed_dim", default=16, type=int, help="latent channels (pixel: 3 * vae_stride^2)")
    group.add_argument("--vae_stride", default=16, type=int, help="tokenizer downsampling (kl16: 16)")


def add_data_args(parser, cache: bool = False):
    group = parser.add_argument_group("data")
    group.add_argument("--img_size", default=256, type=int, help="image side in pixels")
    group.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root holding train/<class>/...")
    group.add_argument("--skip_corrupt", action="store_true", help="skip unreadable images with a warning")
    group.add_argument("--num_workers", default=10, type=int,
                       help="data-loading processes per training process (0: load in the main process);\n"
                            "lowered, with a note, to the CPUs the process may use")
    group.add_argument("--pin_mem", action="store_true", default=True,
                       help="page-locked host memory for the batches (faster copies to a GPU)")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="ordinary host memory")
    if cache:
        group.add_argument("--cached_path", required=True, help="output folder")
        return
    group.add_argument("--mrar_index", default="Imagenet2012_mrar_files.txt",
                       help="MRAR JSON-lines index (tools/build_mrar_index.py); relative to the working directory")
    group.add_argument("--use_cached", action="store_true", help="train on latents cached by main_cache.py")
    group.add_argument("--cached_path", default="", help="folder written by main_cache.py")
    group.add_argument("--no_hflip", action="store_false", dest="hflip",
                       help="no random horizontal flips (on by default, as the original; off for digits or text)")


def add_distributed_args(parser):
    group = parser.add_argument_group("distributed")
    group.add_argument("--device", default=None,
                       help="cuda, cpu, mps, ... (default: cuda when available). cpu means gloo even on a GPU host")
    group.add_argument("--dist_on_itp", action="store_true", help="OpenMPI launcher variables")
    group.add_argument("--dist_url", default="env://",
                       help="rendezvous of torchrun and srun launches (env://: MASTER_ADDR and MASTER_PORT)")
    group.add_argument("--dist_timeout", default=dist.DEFAULT_TIMEOUT_MINUTES, type=float,
                       help="minutes a collective may wait before the run stops with an error (a hang); phases\n"
                            "that rank 0 runs alone (metrics, listing a dataset) are waited for up to "
                            f"{dist.MAIN_PROCESS_WAIT_HOURS:.0f} h")


def add_legacy_args(parser):
    group = parser.add_argument_group("legacy flags of the original (accepted, no effect)")
    for name, (default, kind, reason) in LEGACY_NO_OP_FLAGS.items():
        group.add_argument(f"--{name}", default=default, type=kind, help=f"no-op: {reason}")


def get_args_parser():
    parser = argparse.ArgumentParser("TransDiff training and evaluation", formatter_class=HelpFormatter)

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="transdiff_large", choices=sorted(TRANSDIFF_MODELS),
                       help="model size: width, depth and heads of the encoder and the velocity network\n"
                            "(transdiff_tiny for experiments on a CPU)")
    group.add_argument("--mrar", action="store_true", help="multi-reference autoregression (needs --patch_size 2)")
    group.add_argument("--patch_size", default=1, type=int, help="1 for 1-step AR, 2 for MRAR references")
    group.add_argument("--class_num", default=1000, type=int,
                       help="classes of the class embedding (at least the training data's class folders)")
    group.add_argument("--label_drop_prob", default=0.1, type=float, help="class-label dropout for cfg training")
    group.add_argument("--attn_dropout", default=0.1, type=float, help="dropout of the attention weights")
    group.add_argument("--proj_dropout", default=0.1, type=float,
                       help="dropout after the attention and MLP projections")
    group.add_argument("--buffer_size", default=64, type=int, help="class-embedding prefix slots of the encoder")
    group.add_argument("--diffusion_batch_mul", default=1, type=int,
                       help="noise/time draws per sample per step (README: 4 pretrain, 2 MRAR, 4 512px)")
    group.add_argument("--diffloss_w", default=None, type=int,
                       help="legacy decoder-width flag of the original README; must equal the model width")
    group.add_argument("--grad_checkpointing", nargs="?", const=True, default=False, type=int, metavar="N",
                       help="recompute activations in the backward pass: every block's (the flag alone), or those\n"
                            "of the first N blocks of the encoder and of the decoder: less memory, more compute")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile every encoder and decoder block (inductor, one graph per block) for\n"
                            "training and sampling; CPU needs a C++ compiler. Off by default. The first steps\n"
                            "compile (logged); checkpoints are the same as eager ones")

    add_tokenizer_args(parser)
    add_data_args(parser)

    group = parser.add_argument_group(
        "optimisation", "Training images: random square crop (side min(H,W)) resized to --img_size, random flip.\n"
                        "Cached latents (main_cache.py): ADM centre crop, flip chosen at load time.")
    group.add_argument("--batch_size", default=16, type=int, help="per process; effective = x world x accumulation")
    group.add_argument("--epochs", default=400, type=int, help="epochs to train in all (a resumed run stops there)")
    group.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    group.add_argument("--blr", default=1e-4, type=float,
                       help="base lr per 256 images of effective batch (without --lr: lr = blr x batch / 256)")
    group.add_argument("--min_lr", default=0.0, type=float, help="the lr the cosine schedule ends at")
    group.add_argument("--lr_schedule", default="constant", choices=SCHEDULES,
                       help="after the warm-up: constant (the original's) or cosine down to --min_lr")
    group.add_argument("--warmup_epochs", default=100, type=float, help="per-iteration linear warm-up")
    group.add_argument("--weight_decay", default=0.02, type=float,
                       help="AdamW decay; none on 1-D params, biases and the diffusion decoder (as the original)")
    group.add_argument("--grad_clip", default=3.0, type=float, help="gradient norm clipping (0: off)")
    group.add_argument("--ema_rate", default=0.9999, type=float,
                       help="EMA decay per optimizer step: ema = rate x ema + (1 - rate) x weights")
    group.add_argument("--gradient_accumulation_steps", default=1, type=int,
                       help="micro-batches per optimizer step (their gradients are summed, as the original)")
    group.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and EMA stay float32)")
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: bf16 autocast on a CUDA GPU with native bfloat16 (Ampere and newer), fp32\n"
                            "elsewhere; fp16 (autocast + grad scaler) only when asked: the original's CUDA default,\n"
                            "whose users report NaNs. Weights, optimizer and EMA stay float32; the VAE decode runs\n"
                            "in bf16 or fp32, never fp16. --bf16 means bf16")
    group.add_argument("--tf32", action="store_true",
                       help="TF32 float32 matrix products on CUDA (Ampere and newer): faster, about 1e-3 relative\n"
                            "error. Off by default: float32 products stay float32, as in the original. cuDNN's\n"
                            "convolutions (the VAE) keep PyTorch's default, TF32 allowed, as the original runs them")
    group.add_argument("--zero1", action="store_true",
                       help="shard the AdamW state over the ranks (ZeRO stage 1, torch's ZeroRedundancyOptimizer):\n"
                            "1/world of the optimizer's memory per GPU, the same updates; checkpoints unchanged")
    group.add_argument("--peak_tflops", default=None, type=float,
                       help="the GPU's peak TFLOP/s at the run's precision, for the MFU of the progress lines\n"
                            "(default: known for A100, H100 and H200; elsewhere only the achieved TFLOP/s)")
    group.add_argument("--only_train_diff", action="store_true", help="freeze everything but the diffusion decoder")
    group.add_argument("--seed", default=1, type=int, help="training seed (+rank); base of the per-image seeds")

    group = parser.add_argument_group("sampling")
    group.add_argument("--preset", default=None, choices=sorted(SAMPLING_PRESETS),
                       help="a released model's cfg/scale_0/scale_1 (explicit flags win)")
    group.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS),
                       help=f"default {DEFAULT_SAMPLER}, the original's SDE")
    group.add_argument("--num_sampling_steps", default=100, type=int,
                       help="time steps per image (per MRAR stage)")
    group.add_argument("--cfg", default=None, type=_cfg_list,
                       help="guidance scale, or 4 comma-separated (MRAR)\n"
                            "(default: the --preset's, else 1.0: no guidance)")
    group.add_argument("--cfg_interval", default=None, type=_interval,
                       help="LO,HI: guidance only while t (1 = noise, 0 = data) lies in [LO, HI]; conditional-only\n"
                            "evaluations elsewhere cost half (default: guidance at every step)")
    group.add_argument("--scale_0", default=None, type=float,
                       help="maruyama: drift (mean) scale (default: the --preset's, else 1.0)")
    group.add_argument("--scale_1", default=None, type=float,
                       help="maruyama: noise (std) scale (default: the --preset's, else 1.0)")

    group = parser.add_argument_group("evaluation")
    group.add_argument("--evaluate", action="store_true", help="generate --num_images images and score them")
    group.add_argument("--num_images", default=50000, type=int,
                       help="images to generate, the same number per class (a multiple of --class_num)")
    group.add_argument("--eval_bsz", default=64, type=int, help="generation batch per process")
    group.add_argument("--eval_wo_ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    group.add_argument("--allow_random_weights", action="store_true",
                       help="let --evaluate run without --resume (an untrained model)")
    group.add_argument("--online_eval", action="store_true", help="evaluate every --eval_freq epochs while training")
    group.add_argument("--eval_freq", default=50, type=int,
                       help="epochs between online evaluations and numbered checkpoints checkpoint-<epoch>.pth")
    group.add_argument("--metrics", default=",".join(DEFAULT_METRICS), type=_name_list,
                       help=f"comma-separated, of {', '.join(EVAL_METRICS)}")
    group.add_argument("--fid_stats", default=None,
                       help="reference statistics .npz (default fid_stats/adm_in256_stats.npz or VIRTUAL_imagenet512)")
    group.add_argument("--inception_weights", default=None, help="local torch-fidelity Inception weights file")
    group.add_argument("--ref_images", default=None,
                       help="real images for kid/prc (a folder, searched recursively, or an ADM .npz with arr_0)\n"
                            "and digits (an ImageFolder split)")
    group.add_argument("--prc_weights", default=None,
                       help="local torchvision VGG16 weights file (vgg16-397923af.pth) for --metrics prc")
    group.add_argument("--digits_judge", default=None, help="digits: the judge classifier file (quickstart.py)")
    group.add_argument("--require_metrics", action="store_true", help="fail if a metric cannot be computed")
    group.add_argument("--save_npz", action="store_true", help="also write an ADM-style .npz of the samples")

    group = parser.add_argument_group("previews while training",
                                      "a fixed-seed grid from the EMA weights: <output_dir>/previews/epoch<E>.png "
                                      "and tensorboard")
    group.add_argument("--preview_freq", default=10, type=int, help="epochs between previews, and the last (0: off)")
    group.add_argument("--preview_classes", default=8, type=int, help="rows: classes spread over the class range")
    group.add_argument("--preview_per_class", default=4, type=int, help="columns")
    group.add_argument("--preview_steps", default=25, type=int, help="Euler steps per image")

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--output_dir", default="./output_dir",
                       help="the run's folder: checkpoints, logs, evaluations (one run at a time)")
    group.add_argument("--log_dir", default=None, help="tensorboard folder (default: --output_dir)")
    group.add_argument("--resume", default="", help="checkpoint file or folder (folder: checkpoint-<load_step>.pth)")
    group.add_argument("--load_step", default="last", help="'last' or an epoch number")
    group.add_argument("--init_from", default="", metavar="NAME_OR_PATH",
                       help="start a new run (epoch 0, fresh optimizer) from these weights: a checkpoint file, a run\n"
                            "folder (checkpoint-<load_step>.pth) or a released model's name (transdiff_l, ...,\n"
                            "fetched into the Hugging Face cache); a finetune (docs/finetuning.md)")
    group.add_argument("--class_map", default="", metavar="FILE",
                       help="--init_from with other classes: lines '<class folder> <pretrained class index or\n"
                            "ImageNet wnid>'; those rows of the class embedding are copied, the rest start fresh")
    group.add_argument("--start_epoch", default=0, type=int, help="the first epoch of a run that starts fresh")
    group.add_argument("--save_last_freq", default=5, type=int, help="epochs between checkpoint-last.pth writes")
    group.add_argument("--save_every_steps", default=0, type=int,
                       help="also write checkpoint-last.pth every N optimizer steps inside an epoch (0: off)")
    group.add_argument("--save_every_minutes", default=0.0, type=float,
                       help="also write checkpoint-last.pth every M minutes inside an epoch (0: off).\n"
                            "A SIGTERM (pre-emption) always saves at the next optimizer step, then exits 143")

    add_distributed_args(parser)
    add_legacy_args(parser)
    return parser


def resolve_device(args):
    """The settings step's part shared with main_cache.py: the numbers' ranges and the device decision."""
    check_numbers(vars(args))
    try:
        args.device = dist.resolve_device_type(args.device)
        check_tokenizer_settings(args.tokenizer, args.vae_embed_dim, args.vae_stride)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    if args.img_size % args.vae_stride:
        raise SettingsError(f"--img_size {args.img_size} is not divisible by the tokenizer stride {args.vae_stride}")
    return args


def resolve_args(args):
    """Fill derived settings in place and reject inconsistent ones with a message saying what to change."""
    resolve_device(args)
    try:
        args.cfg, args.scale_0, args.scale_1 = apply_preset(
            args.preset, model=args.model, mrar=args.mrar, img_size=args.img_size, sampler=args.sampler,
            cfg=args.cfg, scale_0=args.scale_0, scale_1=args.scale_1)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    unknown = [name for name in args.metrics if name not in EVAL_METRICS]
    if unknown:
        raise SettingsError(f"--metrics {','.join(unknown)} unknown; choose from {', '.join(EVAL_METRICS)}")
    if args.num_sampling_steps < SAMPLERS[args.sampler].min_steps:
        raise SettingsError(f"--sampler {args.sampler} needs --num_sampling_steps >= "
                            f"{SAMPLERS[args.sampler].min_steps}")
    if args.mrar and args.patch_size != 2:
        raise SettingsError(f"--mrar needs --patch_size 2 (got {args.patch_size}): the references are 2x2-patched "
                            "latents. The original README's MRAR commands pass --patch_size 1 from an older code "
                            "version; the authors later changed them to --patch_size 2.")
    if args.use_cached and not args.cached_path:
        raise SettingsError("--use_cached needs --cached_path (the folder written by main_cache.py)")
    if args.init_from and (args.resume or args.evaluate):
        other = "--resume (continue a run)" if args.resume else "--evaluate (pass the weights to --resume)"
        raise SettingsError(f"--init_from starts a new training run from weights: it does not go with {other}")
    if args.class_map and not args.init_from:
        raise SettingsError("--class_map maps your classes to those of the weights given by --init_from; pass both")
    if args.evaluate and args.num_images % args.class_num:
        raise SettingsError(f"--num_images {args.num_images} must be a multiple of --class_num {args.class_num} "
                            "(the same number of images per class)")
    if args.grad_checkpointing is not True and args.grad_checkpointing < 0:
        raise SettingsError("--grad_checkpointing N takes N >= 0 blocks (the flag alone: every block)")
    if isinstance(args.cfg, list) and not args.mrar:
        raise SettingsError("a per-stage --cfg list needs --mrar")
    for data, flag in ((os.path.join(args.data_path, "train"), "--data_path"), (args.cached_path, "--cached_path")):
        if data and _inside(args.output_dir, data):
            raise SettingsError(f"--output_dir {args.output_dir} is inside the training data {data} ({flag}): its "
                                "images and files would be read as training examples; choose a folder outside it")
    args.precision = resolve_precision("bf16" if args.bf16 else args.precision, args.device)
    args.log_dir = args.log_dir or args.output_dir
    world_size = dist.launch_world_size(args.dist_on_itp)
    args.lr = absolute_lr(args.lr, args.blr, args.batch_size * world_size * args.gradient_accumulation_steps)
    return args


# ---------------------------------------------------------------------------------------------- guardrails
# Soft checks of a run against the machine and its data, made once the model and the data exist: each returns the
# line to log, or None (`loader_workers` logs its own). None of them stops a run.
BIG_MODEL_PARAMETERS = 100_000_000  # transdiff_base (290M) and up; transdiff_tiny has 0.2-0.4M
SMALL_TRAINING_SET = 1000  # training examples: below this, a few hundred images, a big model memorises them


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (Linux: a container's, taskset's or
    a job scheduler's limit), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def capped_workers(requested: int, cpus: int) -> tuple[int, str | None]:
    """`--num_workers` capped at `cpus`: (the loader processes to start, the note saying why it was lowered or
    None)."""
    if requested <= cpus:
        return requested, None
    return cpus, (f"--num_workers {requested} lowered to {cpus}: this process may use {cpus} CPU(s), and more "
                  "loader processes than CPUs only take turns with the training and with each other")


def loader_workers(requested: int, logger) -> int:
    """`--num_workers` capped at the CPUs this process may use (`capped_workers`), logging the note when lowered."""
    workers, note = capped_workers(requested, available_cpus())
    if note:
        logger.info(note)
    return workers


def cpu_training_warning(parameters: int, device_type: str) -> str | None:
    """The warning for training a model of `BIG_MODEL_PARAMETERS` or more on a CPU, else None."""
    if device_type != "cpu" or parameters < BIG_MODEL_PARAMETERS:
        return None
    return (f"training a {parameters / 1e6:.0f}M-parameter model on the CPU: each step takes seconds to minutes and "
            "a run days to years; train it on GPUs, or choose --model transdiff_tiny for a CPU (docs/training.md, "
            "your own data)")


def small_data_warning(parameters: int, examples: int) -> str | None:
    """The warning for a model of `BIG_MODEL_PARAMETERS` or more on fewer than `SMALL_TRAINING_SET` examples."""
    if parameters < BIG_MODEL_PARAMETERS or examples >= SMALL_TRAINING_SET:
        return None
    return (f"{examples} training examples for a {parameters / 1e6:.0f}M-parameter model: it will memorise them "
            "rather than learn to draw new ones; --model transdiff_tiny suits a few hundred images, or start from a "
            "released model (docs/training.md, your own data)")
