"""TransDiff training and evaluation: `torchrun ... main.py ...` on clusters, or `python main.py ...` on one
CPU or GPU. Accepts the original's flags (see README); `--help` groups and explains them.

This file only orchestrates: flags and validation are `util.settings`, saving and restoring a run
`util.run_state`, how the model runs `util.execution`, the loops `engine_transdiff`.
"""
import json
import os
import random
import sys
import time

import numpy as np
import torch

import engine_transdiff as engine
from models.tokenizers import TOKENIZERS, build_tokenizer
from util import distributed as dist
from util import pretrained, run_state
from util.data.class_map import read_class_map
from util.data.crops import train_transform
from util.data.datasets import ImageFolderWithChecks, MRARDataset
from util.data.latent_cache import CachedMRARDataset, open_latent_cache
from util.data.order import ResumableSampler, SeededSamples, epoch_loader_seed
from util.errors import run_cli
from util.execution.flops import peak_flops, training_flops_per_image
from util.execution.precision import autocast_context, configure_cuda_backends, uses_grad_scaler
from util.execution.wrap import compile_blocks, wrap_model
from util.io import append_json_line, remove_stale_temp_files, truncate_json_lines, write_json
from util.logger import TensorboardWriter, create_logger
from util.lr_sched import lr_derivation
from util.optim import EMA, build_grad_scaler, build_optimizer
from util.run_lock import FolderInUse, RunLock
from util.settings import (
    SettingsError,
    cpu_training_warning,
    get_args_parser,
    loader_workers,
    resolve_args,
    small_data_warning,
)


def build_model(args):
    """The TransDiff of the flags (on CPU; the caller moves it)."""
    try:
        return pretrained.build_model(vars(args))
    except ValueError as error:
        raise SettingsError(str(error)) from None


def freeze_untrained(model, only_train_diff: bool):
    """`--only_train_diff`: everything but the diffusion decoder is frozen (the 512 px finetune)."""
    if only_train_diff:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("diffdecoder."))
    return model


def build_run_tokenizer(args, device):
    """The tokenizer; training on cached latents needs no weights (only the posterior and the latent scale), and
    then loads them only for evaluations, or for previews when the weights file is there."""
    wanted = args.evaluate or args.online_eval or (args.preview_freq and os.path.isfile(args.vae_path))
    weightless = args.use_cached and TOKENIZERS[args.tokenizer].needs_weights and not wanted
    tokenizer = build_tokenizer(args.tokenizer, vae_path=args.vae_path, vae_embed_dim=args.vae_embed_dim,
                                vae_stride=args.vae_stride, with_weights=not weightless)
    return tokenizer if weightless else tokenizer.to(device)


def build_train_loader(args, device, num_workers: int):
    """The training data in a resumable order: (dataset, sampler, loader); see `util.data.order`. `num_workers`:
    the loader's processes (`loader_workers`)."""
    train_root = os.path.join(args.data_path, "train")
    if args.use_cached:
        dataset = open_latent_cache(args.cached_path, hflip=args.hflip)
        if args.mrar:
            dataset = CachedMRARDataset(dataset, args.mrar_index)
    elif args.mrar:
        dataset = MRARDataset(train_root, args.mrar_index, transform=train_transform(args.img_size, hflip=args.hflip))
    else:
        dataset = ImageFolderWithChecks(train_root, transform=train_transform(args.img_size, hflip=args.hflip),
                                        skip_corrupt=args.skip_corrupt)
    dataset = SeededSamples(dataset, args.seed)
    sampler = ResumableSampler(dataset, dist.get_world_size(), dist.get_rank(), args.seed, args.batch_size)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                                         num_workers=num_workers, drop_last=True,
                                         pin_memory=args.pin_mem and device.type == "cuda",
                                         persistent_workers=num_workers > 0, generator=torch.Generator())
    if sampler.full_batches == 0:
        raise SettingsError(f"{len(dataset)} training examples on {dist.get_world_size()} process(es) give no full "
                            f"batch of {args.batch_size}; lower --batch_size")
    return dataset, sampler, loader


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def evaluate_online(model, ema, tokenizer, args, epoch, device, context, writer, logger):
    """While training: EMA weights at cfg 1.0 and, when it differs, at the run's cfg."""
    for cfg in [1.0] if args.cfg == 1.0 else [1.0, args.cfg]:
        engine.evaluate(model, ema, tokenizer, args, str(epoch), device, context, writer, logger, cfg=cfg)


def check_classes(dataset, args):
    """The class folders must fit the model's class embedding (and a cache must hold every class)."""
    classes = getattr(dataset, "classes", None) or []
    if len(classes) > args.class_num:
        raise SettingsError(f"the training data has {len(classes)} class folders but --class_num is "
                            f"{args.class_num}: pass --class_num {len(classes)}")


# The files a training run writes atomically in its --output_dir. Only their temporary files are its to remove:
# an evaluation may be writing metrics.json or its image folder there at the same time.
TRAINING_RUN_FILES = ("checkpoint-*", "args.json", "log.jsonl")


def start_training_run(args, logger, start_epoch):
    """Clean what an interrupted run left and keep the logs free of epochs that will be trained again."""
    removed = [remove_stale_temp_files(args.output_dir, name) for name in TRAINING_RUN_FILES]
    count, size = sum(files for files, _ in removed), sum(size for _, size in removed)
    if count:
        logger.info(f"removed {count} temporary file(s) ({size / 2**20:.1f} MiB) of interrupted saves")
    dropped = truncate_json_lines(os.path.join(args.output_dir, "log.jsonl"), lambda r: r["epoch"] < start_epoch)
    if dropped:
        logger.info(f"log.jsonl: dropped {dropped} record(s) of epochs from {start_epoch} on, which run again")


def write_run_args(args) -> None:
    """`<output_dir>/args.json`: the settings of the run that wrote the folder's latest checkpoint (rank 0, after
    each save; a run that fails before its first save leaves the folder's as it was)."""
    if dist.is_main_process():
        write_json(os.path.join(args.output_dir, "args.json"), vars(args))


def run_settings(args, init_from: str = "", class_rows: dict | None = None) -> run_state.RunSettings:
    return run_state.RunSettings(
        output_dir=args.output_dir, flags=dict(vars(args)), seed=args.seed, batch_size=args.batch_size,
        accumulation_steps=args.gradient_accumulation_steps, resume=args.resume, init_from=init_from,
        class_rows=class_rows, load_step=args.load_step, evaluate=args.evaluate,
        allow_random_weights=args.allow_random_weights, start_epoch=args.start_epoch,
        save_every_steps=args.save_every_steps, save_every_minutes=args.save_every_minutes)


def finetune_start(args, dataset) -> tuple[str, dict | None]:
    """``--init_from``'s checkpoint file and ``--class_map``'s rows ({your class: pretrained class}); nothing when
    the run has no --init_from or already has its own checkpoint-last.pth (an interrupted finetune continues).
    Rank 0 resolves the weights first (a released name is downloaded once), then the others find them."""
    if not args.init_from or os.path.isfile(run_state.checkpoint_path(args.output_dir, run_state.LAST)):
        return "", None
    path = refusal = None
    if dist.is_main_process():
        try:
            path = pretrained.weights_file(args.init_from, args.load_step)
        except (OSError, ValueError, RuntimeError) as error:
            refusal = f"--init_from {error}"
    refusal = dist.broadcast_object(refusal)
    if refusal:
        raise SettingsError(refusal)
    if path is None:  # the other ranks, once rank 0 has the file
        path = pretrained.weights_file(args.init_from, args.load_step)
    if not args.class_map:
        return path, None
    try:
        return path, read_class_map(args.class_map, list(getattr(dataset, "classes", None) or []))
    except (OSError, ValueError) as error:
        raise SettingsError(str(error)) from None


def restore_replicas(run, model, ema, optimizer, scaler, logger) -> run_state.Restored:
    """Restore the run's weights, then give every rank rank 0's model and EMA: each rank built its own random
    initialisation (seeded seed + rank), so without this a run from scratch would average a different EMA on
    every rank, and an online evaluation would sample two models."""
    restored = run_state.restore(run, model, ema, optimizer, scaler, logger)
    dist.broadcast_module(model)
    dist.broadcast_module(ema.module)
    return restored


def training_monitor(args, device, logger) -> engine.TrainingMonitor:
    """The loss and speed reader of a run, with the model FLOPs of a training image counted on the meta device."""
    flops = training_flops_per_image(lambda: freeze_untrained(build_model(args), args.only_train_diff))
    peak = peak_flops(device, args.precision, args.tf32, args.peak_tflops)
    logger.info(f"model FLOPs: {flops / 1e12:.4g} TFLOP per training image (forward and backward, "
                f"diffusion_batch_mul {args.diffusion_batch_mul}); "
                + (f"peak {peak / 1e12:.0f} TFLOP/s at {args.precision}: MFU in the progress lines" if peak else
                   "no known peak for this device (--peak_tflops): achieved TFLOP/s in the progress lines"))
    return engine.TrainingMonitor(device, args.batch_size, flops, peak)


def train(args, model, ema, tokenizer, device, context, logger):
    optimizer = build_optimizer(model, args.lr, args.weight_decay, device_type=device.type, shard_state=args.zero1)
    scaler = build_grad_scaler(uses_grad_scaler(args.precision), device.type)
    dataset, sampler, loader = build_train_loader(args, device, loader_workers(args.num_workers, logger))
    check_classes(dataset, args)
    run = run_settings(args, *finetune_start(args, dataset))
    restored = restore_replicas(run, model, ema, optimizer, scaler, logger)
    if restored.start_epoch > args.epochs:
        raise SettingsError(f"the run is already at epoch {restored.start_epoch - 1}, beyond --epochs {args.epochs}; "
                            "raise --epochs to train further")
    steps = sampler.full_batches
    logger.info(f"training data: {len(dataset)} examples in {len(getattr(dataset, 'classes', []) or [])} classes, "
                f"{steps} batches per epoch and process; " + lr_derivation(
                    args.lr, args.blr, args.batch_size, args.gradient_accumulation_steps, dist.get_world_size()))
    warn_if(logger, small_data_warning(sum(p.numel() for p in model.parameters()), len(dataset)))
    if dist.is_main_process():
        start_training_run(args, logger, restored.start_epoch)
    monitor = training_monitor(args, device, logger)
    execution = wrap_model(model, device, compile=args.compile)
    writer = TensorboardWriter(args.log_dir, enabled=dist.is_main_process(),
                               purge_step=int((restored.start_epoch + restored.start_step / steps) * 1000))
    can_preview = args.preview_freq and not any(p.is_meta for p in tokenizer.parameters())
    checkpoints = run_state.Checkpointer(run, execution, ema, optimizer, scaler, steps, logger,
                                         before_save=lambda: engine.check_before_save(monitor, model, ema),
                                         after_save=lambda: write_run_args(args))
    logger.info(f"training epochs {restored.start_epoch}..{args.epochs - 1}" if restored.start_epoch < args.epochs
                else f"nothing to train: the run already finished epoch {args.epochs - 1}")
    started = time.time()
    try:
        for epoch in range(restored.start_epoch, args.epochs):
            start_step = restored.start_step if epoch == restored.start_epoch else 0
            sampler.set_position(epoch, start_step)
            loader.generator.manual_seed(epoch_loader_seed(args.seed, epoch))
            stats = engine.train_one_epoch(execution, ema, tokenizer, loader, optimizer, scaler, epoch, args, device,
                                           context, writer, logger, monitor, start_step, steps,
                                           lambda done, epoch=epoch: checkpoints.inside_epoch(epoch, done))
            last_epoch = epoch + 1 == args.epochs
            if epoch % args.save_last_freq == 0 or last_epoch:
                checkpoints.save(run_state.LAST, epoch, steps)
            if can_preview and (epoch % args.preview_freq == 0 or last_epoch):
                logger.info(f"preview: {engine.preview(ema.module, tokenizer, args, epoch, device, context, writer)}")
            if args.online_eval and (epoch % args.eval_freq == 0 or last_epoch):
                evaluate_online(model, ema, tokenizer, args, epoch, device, context, writer, logger)
            if epoch > 0 and (epoch % args.eval_freq == 0 or last_epoch):
                checkpoints.save(epoch, epoch, steps)
            if dist.is_main_process():
                append_json_line(os.path.join(args.output_dir, "log.jsonl"), {"epoch": epoch, **stats})
    finally:
        checkpoints.close()
        writer.close()
        stop_loader_workers(loader)
    logger.info(f"training took {(time.time() - started) / 60:.1f} min")


def stop_loader_workers(loader) -> None:
    """Stop the loader's persistent workers now. After an error they would live on until the loader is collected,
    which may be at an unrelated moment (a notebook's next run), and then take seconds to stop."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def warn_if(logger, warning: str | None) -> None:
    """Log a guardrail's warning (`util.settings`), if it has one."""
    if warning:
        logger.warning("warning: " + warning)


def claim_output_dir(output_dir: str) -> tuple[RunLock | None, str | None]:
    """Rank 0 takes the folder's lock (`util.run_lock`): (the lock, a note on a dead run's lock taken over). Every
    rank stops with rank 0's message when another run holds the folder."""
    lock = note = refusal = None
    if dist.is_main_process():
        lock = RunLock(output_dir)
        try:
            note = lock.acquire()
        except FolderInUse as error:
            lock, refusal = None, str(error)
    refusal = dist.broadcast_object(refusal)
    if refusal:
        raise FolderInUse(refusal)
    return lock, note


def main(args):
    info = dist.init_distributed(args.device, args.dist_on_itp, args.dist_url, args.dist_timeout)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        lock, note = claim_output_dir(args.output_dir)
        try:
            train_or_evaluate(args, info.device, note)
        finally:
            if lock is not None:
                lock.release()
    finally:
        dist.cleanup()


def train_or_evaluate(args, device, lock_note):
    """Train or evaluate, holding the output folder."""
    if device.type == "cuda":
        configure_cuda_backends(args.tf32)
    logger = create_logger(args.output_dir)
    logger.info("command: " + " ".join(sys.argv))
    if lock_note:
        logger.info(lock_note)
    logger.info(json.dumps(vars(args), indent=1, default=str))
    seed_everything(args.seed + dist.get_rank())

    tokenizer = build_run_tokenizer(args, device)
    model = build_model(args).to(device)
    freeze_untrained(model, args.only_train_diff)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"{args.model}: {parameters / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable")
    if not args.evaluate:
        warn_if(logger, cpu_training_warning(parameters, device.type))
    ema = EMA(model)
    if args.compile:  # sampling runs the EMA weights (the raw ones with --eval_wo_ema); training: wrap_model
        compile_blocks(ema.module)
        if args.evaluate:
            compile_blocks(model)
    context = autocast_context(args.precision, device.type)
    if args.evaluate:
        restored = restore_replicas(run_settings(args), model, ema, None, None, logger)
        (ema.module if args.eval_wo_ema else model).to("cpu")  # only the sampled weights stay on the device
        writer = TensorboardWriter(args.log_dir, enabled=dist.is_main_process())
        engine.evaluate(model, ema, tokenizer, args, restored.epoch_label, device, context, writer, logger,
                        cfg=args.cfg, use_ema=not args.eval_wo_ema, source=restored.path)
        writer.close()
    else:
        train(args, model, ema, tokenizer, device, context, logger)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_cli("main.py", lambda: main(resolve_args(args)))


if __name__ == "__main__":
    cli()
