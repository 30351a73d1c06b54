"""TransDiff training and evaluation: `torchrun ... main.py ...` on clusters, or `python main.py ...` on one
CPU or GPU. Accepts the original's flags (see README); `--help` groups and explains them."""
import argparse
import hashlib
import json
import os
import random
import sys
import time

import numpy as np
import torch

import engine_transdiff as engine
from models.tokenizers import TOKENIZERS, build_tokenizer
from models.transdiff import TRANSDIFF_MODELS
from models.vae import AutoencoderKL
from util import distributed as dist
from util.checkpoint import (
    adapt_state_dict,
    checkpoint_paths,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    select_weights,
)
from util.crops import train_transform
from util.datasets import CachedLatentFolder, ImageFolderWithChecks, MRARDataset
from util.logger import TensorboardWriter, create_logger
from util.lr_sched import resolve_lr
from util.optim import EMA, build_grad_scaler, build_optimizer
from util.presets import LEGACY_NO_OP_FLAGS, SAMPLING_PRESETS

SAMPLER_CHOICES = ("maruyama", "euler", "heun")


def _cfg_list(text):
    """'1.3' -> 1.3; '1.0,1.2,1.3,1.5' -> [1.0, 1.2, 1.3, 1.5] (one per MRAR stage)."""
    values = [float(v) for v in str(text).split(",")]
    return values[0] if len(values) == 1 else values


def get_args_parser():
    parser = argparse.ArgumentParser("TransDiff training and evaluation", formatter_class=argparse.RawTextHelpFormatter)

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="transdiff_large", choices=sorted(TRANSDIFF_MODELS))
    group.add_argument("--mrar", action="store_true", help="multi-reference autoregression (needs --patch_size 2)")
    group.add_argument("--patch_size", default=1, type=int, help="1 for 1-step AR, 2 for MRAR references")
    group.add_argument("--img_size", default=256, type=int, help="image side in pixels")
    group.add_argument("--class_num", default=1000, type=int)
    group.add_argument("--label_drop_prob", default=0.1, type=float, help="class-label dropout for cfg training")
    group.add_argument("--attn_dropout", default=0.1, type=float)
    group.add_argument("--proj_dropout", default=0.1, type=float)
    group.add_argument("--buffer_size", default=64, type=int, help="class-embedding prefix slots of the encoder")
    group.add_argument("--diffusion_batch_mul", default=1, type=int,
                       help="noise/time draws per sample per step (README: 4 pretrain, 2 MRAR, 4 512px)")
    group.add_argument("--diffloss_w", default=None, type=int,
                       help="legacy decoder-width flag of the original README; must equal the model width")
    group.add_argument("--grad_checkpointing", action="store_true")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer", default="kl16", choices=TOKENIZERS,
                       help="kl16: MAR's KL-16 VAE (weights from --vae_path); pixel: parameter-free space-to-depth")
    group.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt")
    group.add_argument("--vae_embed_dim", default=16, type=int, help="latent channels (pixel: 3 * vae_stride^2)")
    group.add_argument("--vae_stride", default=16, type=int, help="tokenizer downsampling (kl16: 16)")

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root holding train/<class>/...")
    group.add_argument("--mrar_index", default="Imagenet2012_mrar_files.txt",
                       help="MRAR JSON-lines index (tools/build_mrar_index.py); relative to the working directory")
    group.add_argument("--use_cached", action="store_true", help="train on latents cached by main_cache.py")
    group.add_argument("--cached_path", default="", help="folder written by main_cache.py")
    group.add_argument("--skip_corrupt", action="store_true", help="skip unreadable images with a warning")
    group.add_argument("--no_hflip", action="store_false", dest="hflip",
                       help="no random horizontal flips (on by default, as the original; off for digits or text)")
    group.add_argument("--num_workers", default=10, type=int)
    group.add_argument("--pin_mem", action="store_true", default=True)
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

    group = parser.add_argument_group(
        "optimisation", "Training images: random square crop (side min(H,W)) resized to --img_size, random flip.\n"
                        "Cached latents (main_cache.py): ADM centre crop, flip chosen at load time.")
    group.add_argument("--batch_size", default=16, type=int, help="per process; effective = x world x accumulation")
    group.add_argument("--epochs", default=400, type=int)
    group.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    group.add_argument("--blr", default=1e-4, type=float)
    group.add_argument("--min_lr", default=0.0, type=float)
    group.add_argument("--lr_schedule", default="constant", choices=("constant", "cosine"))
    group.add_argument("--warmup_epochs", default=100, type=float, help="per-iteration linear warm-up")
    group.add_argument("--weight_decay", default=0.02, type=float,
                       help="AdamW decay; none on 1-D params, biases and the diffusion decoder (as the original)")
    group.add_argument("--grad_clip", default=3.0, type=float)
    group.add_argument("--ema_rate", default=0.9999, type=float)
    group.add_argument("--gradient_accumulation_steps", default=1, type=int,
                       help="micro-batches per optimizer step (their gradients are summed, as the original)")
    group.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and EMA stay float32)")
    group.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="auto: fp16 autocast + grad scaler on CUDA, fp32 on CPU; --bf16 means bf16")
    group.add_argument("--only_train_diff", action="store_true", help="freeze everything but the diffusion decoder")
    group.add_argument("--seed", default=1, type=int, help="training seed (+rank); base of the per-image seeds")

    group = parser.add_argument_group("sampling")
    group.add_argument("--preset", default=None, choices=sorted(SAMPLING_PRESETS),
                       help="a released model's cfg/scale_0/scale_1 (explicit flags win)")
    group.add_argument("--sampler", default="maruyama", help=f"one of {', '.join(SAMPLER_CHOICES)} ('' = maruyama)")
    group.add_argument("--num_sampling_steps", default="100", help="network evaluations per image (per MRAR stage)")
    group.add_argument("--cfg", default=None, type=_cfg_list, help="guidance scale, or 4 comma-separated (MRAR)")
    group.add_argument("--scale_0", default=None, type=float, help="maruyama: drift (mean) scale, default 1.0")
    group.add_argument("--scale_1", default=None, type=float, help="maruyama: noise (std) scale, default 1.0")

    group = parser.add_argument_group("evaluation")
    group.add_argument("--evaluate", action="store_true", help="generate --num_images images and compute FID/IS")
    group.add_argument("--num_images", default=50000, type=int)
    group.add_argument("--eval_bsz", default=64, type=int, help="generation batch per process")
    group.add_argument("--eval_wo_ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    group.add_argument("--online_eval", action="store_true", help="evaluate every --eval_freq epochs while training")
    group.add_argument("--eval_freq", default=50, type=int)
    group.add_argument("--fid_stats", default=None,
                       help="reference statistics .npz (default fid_stats/adm_in256_stats.npz or VIRTUAL_imagenet512)")
    group.add_argument("--inception_weights", default=None, help="local torch-fidelity Inception weights file")
    group.add_argument("--require_metrics", action="store_true", help="fail if FID/IS cannot be computed")
    group.add_argument("--save_npz", action="store_true", help="also write an ADM-style .npz of the samples")

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--output_dir", default="./output_dir")
    group.add_argument("--log_dir", default=None, help="tensorboard folder (default: --output_dir)")
    group.add_argument("--resume", default="", help="checkpoint file or folder (folder: checkpoint-<load_step>.pth)")
    group.add_argument("--load_step", default="last", help="'last' or an epoch number")
    group.add_argument("--start_epoch", default=0, type=int)
    group.add_argument("--save_last_freq", default=5, type=int, help="epochs between checkpoint-last.pth writes")

    group = parser.add_argument_group("distributed")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cuda, cpu, mps, ... (default: cuda when available)")
    group.add_argument("--world_size", default=1, type=int)
    group.add_argument("--local_rank", default=-1, type=int)
    group.add_argument("--dist_on_itp", action="store_true", help="OpenMPI launcher variables")
    group.add_argument("--dist_url", default="env://")
    group.add_argument("--dist_timeout", default=120, type=float,
                       help="minutes a rank waits in a collective (rank 0 computes FID while others wait)")

    group = parser.add_argument_group("legacy flags of the original (accepted, no effect)")
    group.add_argument("--num_iter", default=64, type=int, help="no-op: " + LEGACY_NO_OP_FLAGS["num_iter"])
    group.add_argument("--temperature", default=1.0, type=float, help="no-op: " + LEGACY_NO_OP_FLAGS["temperature"])
    group.add_argument("--cfg_schedule", default="linear", help="no-op: " + LEGACY_NO_OP_FLAGS["cfg_schedule"])
    return parser


class SettingsError(ValueError):
    """An inconsistent combination of flags; the message says what to change."""


def resolve_args(args):
    """Fill derived settings in place and reject inconsistent ones with a message saying what to change."""
    if args.sampler == "":
        args.sampler = "maruyama"
    if args.sampler not in SAMPLER_CHOICES:
        raise SettingsError(f"--sampler {args.sampler!r} is unknown; choose one of {', '.join(SAMPLER_CHOICES)}")
    preset = SAMPLING_PRESETS[args.preset] if args.preset else None
    if preset is not None and (preset.mrar != args.mrar or preset.model != args.model):
        needed = f"--model {preset.model}" + (" --mrar --patch_size 2" if preset.mrar else "")
        raise SettingsError(f"--preset {args.preset} is for {needed}")
    stochastic = args.sampler == "maruyama"
    for name in ("cfg", "scale_0", "scale_1"):
        if getattr(args, name) is None:
            from_preset = preset is not None and (name == "cfg" or stochastic)
            setattr(args, name, getattr(preset, name) if from_preset else 1.0)
    if not stochastic and (args.scale_0, args.scale_1) != (1.0, 1.0):
        raise SettingsError(f"--scale_0/--scale_1 only apply to --sampler maruyama, not {args.sampler}")
    try:
        args.num_sampling_steps = int(args.num_sampling_steps)
    except ValueError:
        raise SettingsError(f"--num_sampling_steps must be an integer, got {args.num_sampling_steps!r}") from None

    if args.mrar and args.patch_size != 2:
        raise SettingsError(f"--mrar needs --patch_size 2 (got {args.patch_size}): the references are 2x2-patched "
                            "latents. The original README's MRAR commands pass --patch_size 1 from an older code "
                            "version; the authors later changed them to --patch_size 2.")
    if args.mrar and args.use_cached:
        raise SettingsError("--use_cached is not supported with --mrar (MRAR reads 4 images per example)")
    if args.use_cached and not args.cached_path:
        raise SettingsError("--use_cached needs --cached_path (the folder written by main_cache.py)")
    if args.img_size % args.vae_stride:
        raise SettingsError(f"--img_size {args.img_size} is not divisible by the tokenizer stride {args.vae_stride}")
    if args.tokenizer == "kl16" and args.vae_stride != 16:
        raise SettingsError(f"--tokenizer kl16 has stride 16; drop --vae_stride {args.vae_stride}")
    if args.evaluate and args.num_images % args.class_num:
        raise SettingsError(f"--num_images {args.num_images} must be a multiple of --class_num {args.class_num} "
                            "(the same number of images per class)")
    if args.gradient_accumulation_steps < 1 or args.batch_size < 1 or args.eval_bsz < 1:
        raise SettingsError("--batch_size, --eval_bsz and --gradient_accumulation_steps must be >= 1")
    if isinstance(args.cfg, list) and not args.mrar:
        raise SettingsError("a per-stage --cfg list needs --mrar")
    if args.bf16:
        args.precision = "bf16"
    args.log_dir = args.log_dir or args.output_dir
    return args


def build_model(args):
    """The TransDiff of the flags (on CPU; the caller moves it)."""
    try:
        return TRANSDIFF_MODELS[args.model](
            img_size=args.img_size, patch_size=args.patch_size, vae_embed_dim=args.vae_embed_dim,
            vae_stride=args.vae_stride, label_drop_prob=args.label_drop_prob, class_num=args.class_num,
            attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout, buffer_size=args.buffer_size,
            diffloss_w=args.diffloss_w, num_sampling_steps=args.num_sampling_steps,
            diffusion_batch_mul=args.diffusion_batch_mul, grad_checkpointing=args.grad_checkpointing, mrar=args.mrar)
    except ValueError as error:
        raise SettingsError(str(error)) from None


def resolve_device(name):
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda was asked for but CUDA is not available; pass --device cpu")
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", dist.get_local_rank())
    return device


def build_train_dataset(args):
    train_root = os.path.join(args.data_path, "train")
    if args.use_cached:
        return CachedLatentFolder(args.cached_path, hflip=args.hflip)
    transform = train_transform(args.img_size, hflip=args.hflip)
    if args.mrar:
        return MRARDataset(train_root, args.mrar_index, transform=transform)
    return ImageFolderWithChecks(train_root, transform=transform, skip_corrupt=args.skip_corrupt)


def check_checkpoint_matches_flags(weights, model, args, path):
    """Explain the common flag mistakes when a checkpoint's shapes differ from the model's."""
    mask = weights.get("mask_token")
    if mask is not None and mask.shape[1] > 1 and not args.mrar:
        raise SettingsError(f"{path} is an MRAR checkpoint (mask_token {tuple(mask.shape)}): add --mrar --patch_size 2")
    width = weights["fake_latent"].shape[1] if "fake_latent" in weights else None
    if width is not None and width != model.fake_latent.shape[1]:
        names = [name for name in TRANSDIFF_MODELS if _width_of(name) == width]
        raise SettingsError(f"{path} has width {width} but --model {args.model} has width "
                            f"{model.fake_latent.shape[1]}" + (f": pass --model {names[0]}" if names else ""))


def _width_of(name):
    with torch.device("meta"):
        return TRANSDIFF_MODELS[name]().fake_latent.shape[1]


def restore(args, model, ema, optimizer, scaler, logger):
    """Load a checkpoint (optimizer and scaler are None when evaluating). Returns (start_epoch, epoch_label).

    Our own run's `<output_dir>/checkpoint-last.pth` wins (an interrupted run continues exactly: weights,
    EMA, optimizer, scaler, epoch and every rank's RNG state). Otherwise `--resume` continues exactly when
    it is a training checkpoint of the same configuration, and initialises the weights (adapting new-shaped
    tensors, starting at epoch 0) when it is a released or differently-shaped checkpoint, e.g. a 1-step
    model for an MRAR or 512 px finetune.
    """
    own = checkpoint_paths(args.output_dir, 0).last
    path = None
    if not args.evaluate and os.path.isfile(own):
        path = own
    elif args.resume:
        path = find_resume_checkpoint(args.resume, None if args.load_step == "last" else int(args.load_step))
        if path is None:
            message = f"--resume {args.resume}: no checkpoint-{args.load_step}.pth there"
            if args.evaluate:
                raise SettingsError(message + "; nothing to evaluate")
            logger.warning("!" * 80 + f"\n{message}; TRAINING FROM SCRATCH\n" + "!" * 80)
    if path is None:
        return args.start_epoch, "scratch"

    checkpoint = load_checkpoint(path)
    raw, source = select_weights(checkpoint, use_ema=False)
    check_checkpoint_matches_flags(raw, model, args, path)
    same_run = ("optimizer" in checkpoint and "epoch" in checkpoint and
                all(checkpoint.get("args", {}).get(k) == getattr(args, k) for k in ("model", "mrar", "img_size")))
    target = model.state_dict()
    weights, report = adapt_state_dict(raw, target)
    model.load_state_dict(weights, strict=True)
    ema_weights = adapt_state_dict(select_weights(checkpoint, use_ema=True)[0], target)[0]
    ema.load_state_dict(ema_weights)
    for line in report:
        logger.info(f"adapted: {line}")
    epoch = int(checkpoint.get("epoch", -1))
    if same_run and not args.evaluate:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if not restore_rng_state(checkpoint.get("rng_states")):
            logger.warning("the world size changed since this checkpoint: training continues, but its random "
                           "draws differ from an uninterrupted run")
        logger.info(f"resumed {path} (epoch {epoch}): continuing at epoch {epoch + 1}")
        return epoch + 1, str(epoch)
    if args.evaluate:
        logger.info(f"evaluating weights from {path} (epoch {epoch})")
    else:
        logger.info(f"initialised from {path} ({source}, epoch {epoch}); optimizer and epoch start fresh")
    return (0 if not args.evaluate else args.start_epoch), (str(epoch) if epoch >= 0 else "released")


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(states) -> bool:
    """Each rank restores its own generator states; False (nothing restored) if the world size changed."""
    if not states or len(states) != dist.get_world_size():
        return False
    state = states[dist.get_rank()]
    torch.set_rng_state(state["torch"])
    numpy_state = np.random.get_state()
    np.random.set_state((numpy_state[0], np.array(state["numpy"], dtype=np.uint32), *numpy_state[2:]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def parameter_digest(model) -> str:
    """sha256 of every parameter's bytes: equal on all ranks iff their weights are identical."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(args, model, ema, optimizer, scaler, epoch, name):
    """Write checkpoint-<name>.pth atomically; every rank contributes its RNG state and a weight digest,
    and a divergence between ranks is an error rather than a silently saved rank-0 copy."""
    states = dist.all_gather_object(rng_state())
    digests = dist.all_gather_object(parameter_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' weights diverged at epoch {epoch}: {digests}")
    if not dist.is_main_process():
        return
    state = {"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": epoch, "args": vars(args), "rng_states": states, "rank_weight_digests": digests}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{name}.pth"), state)


def main(args):
    dist.init_distributed(args, timeout_minutes=args.dist_timeout)
    os.makedirs(args.output_dir, exist_ok=True)
    logger = create_logger(args.output_dir)
    device = resolve_device(args.device)
    logger.info("command: " + " ".join(sys.argv))
    logger.info(json.dumps(vars(args), indent=1, default=str))
    if dist.is_main_process():
        with open(os.path.join(args.output_dir, "args.json"), "w") as handle:
            json.dump(vars(args), handle, indent=1, default=str)

    seed = args.seed + dist.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    if args.use_cached and args.tokenizer == "kl16" and not (args.evaluate or args.online_eval):
        # Cached moments only need the posterior and the latent scale, not the VAE weights.
        with torch.device("meta"):
            tokenizer = AutoencoderKL(embed_dim=args.vae_embed_dim)
    else:
        try:
            tokenizer = build_tokenizer(args.tokenizer, vae_path=args.vae_path, vae_embed_dim=args.vae_embed_dim,
                                        vae_stride=args.vae_stride).to(device)
        except ValueError as error:  # wrong channel count or stride, or a file that is not a KL-16 checkpoint
            raise SettingsError(str(error)) from None
    model = build_model(args).to(device)
    if args.only_train_diff:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("diffdecoder."))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                f"{trainable / 1e6:.2f}M trainable")

    ema = EMA(model)
    writer = TensorboardWriter(args.log_dir, enabled=dist.is_main_process())
    context = engine.precision_context(args.precision, device)
    if args.evaluate:
        _, epoch_label = restore(args, model, ema, None, None, logger)
        engine.evaluate(model, ema, tokenizer, args, epoch_label, device, context, writer, logger,
                        cfg=args.cfg, use_ema=not args.eval_wo_ema)
        writer.close()
        dist.cleanup()
        return

    eff_batch = args.batch_size * dist.get_world_size() * args.gradient_accumulation_steps
    args.lr = resolve_lr(args, eff_batch)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    logger.info(f"effective batch {eff_batch}, lr {args.lr:.3g}")
    scaler = build_grad_scaler(args.precision == "fp16" or (args.precision == "auto" and device.type == "cuda"),
                               device.type)
    start_epoch, _ = restore(args, model, ema, optimizer, scaler, logger)

    dataset = build_train_dataset(args)
    logger.info(f"training data: {len(dataset)} examples in {len(getattr(dataset, 'classes', []) or [])} classes")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                                  shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                                         num_workers=args.num_workers, drop_last=True,
                                         pin_memory=args.pin_mem and device.type == "cuda")
    if len(loader) == 0:
        raise SettingsError(f"{len(dataset)} training examples on {dist.get_world_size()} process(es) give no full "
                            f"batch of {args.batch_size}; lower --batch_size")
    ddp_model = model
    if dist.is_initialized():
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logger.info(f"training epochs {start_epoch}..{args.epochs - 1}")
    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        stats = engine.train_one_epoch(ddp_model, model, ema, tokenizer, loader, optimizer, scaler, epoch, args,
                                       device, context, writer, logger)
        last_epoch = epoch + 1 == args.epochs
        if epoch % args.save_last_freq == 0 or last_epoch:
            save(args, model, ema, optimizer, scaler, epoch, "last")
        if args.online_eval and (epoch % args.eval_freq == 0 or last_epoch):
            engine.evaluate(model, ema, tokenizer, args, str(epoch), device, context, writer, logger, cfg=1.0,
                            use_ema=True)
            if args.cfg != 1.0:
                engine.evaluate(model, ema, tokenizer, args, str(epoch), device, context, writer, logger,
                                cfg=args.cfg, use_ema=True)
        if epoch > 0 and (epoch % args.eval_freq == 0 or last_epoch):
            save(args, model, ema, optimizer, scaler, epoch, str(epoch))
        if dist.is_main_process():
            with open(os.path.join(args.output_dir, "log.jsonl"), "a") as handle:
                handle.write(json.dumps({"epoch": epoch, **stats}) + "\n")
    logger.info(f"training took {(time.time() - started) / 60:.1f} min")
    writer.close()
    dist.cleanup()


def cli(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        resolve_args(args)
        main(args)
    except (SettingsError, FileNotFoundError) as error:
        parser.exit(2, f"main.py: error: {error}\n")
    except engine.NonFiniteLoss as error:
        parser.exit(1, f"main.py: {error}\n")


if __name__ == "__main__":
    cli()
