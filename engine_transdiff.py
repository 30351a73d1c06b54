"""One engine for every model mode: training epochs, evaluation (generation + FID/IS) and latent caching."""
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import List, NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from models.tokenizers import encode_to_latents, latents_from_moments
from util import distributed as dist
from util.checkpoint import first_non_finite
from util.errors import RunError
from util.eval.fidelity import MissingMetricFile
from util.eval.images import constant_images, evaluation_grid, is_constant_png, to_uint8, zoomed_grid
from util.eval.layout import Evaluation, claim_folder, image_class, image_noise, image_path, is_complete_png
from util.eval.npz_export import write_adm_npz
from util.eval.registry import EVAL_METRICS, SHARED_INCEPTION, MetricSettings
from util.execution.flops import Throughput
from util.execution.precision import decode_images
from util.execution.wrap import parameter_digest
from util.io import append_json_record, atomic_write, remove_stale_temp_files, save_png
from util.logger import MetricLogger, SmoothedValue
from util.lr_sched import LrSchedule, adjust_learning_rate

PRINT_FREQ = 20
PNG_WRITERS = 4  # threads encoding and writing an evaluation's PNGs beside the generation


class NonFiniteLoss(RunError):
    """Training stopped because the loss, the weights or the EMA held a NaN or an infinity (nothing is saved after
    it)."""


def batch_to_latents(batch, tokenizer, device, use_cached: bool):
    """A loader batch -> (latents, labels): latents [B, C, h, w] (MRAR: a list of them), × latent_scale."""
    *images, labels = batch
    with torch.no_grad():
        if use_cached:
            latents = [latents_from_moments(tokenizer, x.to(device, non_blocking=True)) for x in images]
        else:
            latents = [encode_to_latents(tokenizer, x.to(device, non_blocking=True)) for x in images]
    return (latents if len(latents) > 1 else latents[0]), labels.to(device, non_blocking=True)


class Window(NamedTuple):
    """The training steps between two reads of the loss: their mean loss over every rank, and the speed."""

    loss: float
    steps: int
    throughput: Throughput


class TrainingMonitor:
    """The training loss and speed, read from the device only every `PRINT_FREQ` steps and before every save.

    A step adds its loss to a sum that stays on the device, so no step waits for the GPU; `flush` reduces the sum
    over the ranks (one device synchronisation), checks it is finite, and records a `Window` with the images per
    second and the model FLOP/s (`util.execution.flops`) since the previous flush.
    """

    def __init__(self, device: torch.device, images_per_step: int, flops_per_image: float,
                 peak: Optional[float] = None):
        self.device, self.images_per_step = device, images_per_step
        self.flops_per_image, self.peak = flops_per_image, peak
        self.windows: List[Window] = []
        self._restart(None)

    def _restart(self, position) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.first, self.last = 0, position, position
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Count one micro-batch's loss (a scalar on the device) of batch `step` of `epoch`."""
        self.loss_sum += loss.detach().float()
        self.steps += 1
        self.first, self.last = self.first or (epoch, step), (epoch, step)

    def flush(self) -> None:
        """Read the steps added since the last flush into `windows`; raises NonFiniteLoss for a NaN or infinite
        loss (it is called before every save, so a diverged step is never saved)."""
        if not self.steps:
            return
        loss = dist.all_reduce_mean(self.loss_sum) / self.steps
        if not math.isfinite(loss):
            (epoch, first), (_, last) = self.first, self.last
            raise NonFiniteLoss(f"loss is {loss} at epoch {epoch}, steps {first}-{last}; stopping without saving "
                                f"these steps. {RESUME_ADVICE}")
        seconds = time.perf_counter() - self.started
        self.windows.append(Window(loss, self.steps, Throughput.of(
            self.steps * self.images_per_step, seconds, self.flops_per_image, self.peak)))
        self._restart(None)

    def take(self) -> List[Window]:
        """The windows flushed since the last call."""
        windows, self.windows = self.windows, []
        return windows


RESUME_ADVICE = ("A rerun resumes from the last checkpoint saved before them, if any; with fp16, try --bf16, or "
                 "lower --lr or --grad_clip")


def check_before_save(monitor: TrainingMonitor, model: torch.nn.Module, ema) -> None:
    """What every save checks first, so that a diverged step is never saved: the loss since its last read
    (`TrainingMonitor.flush`), then the weights and the EMA, every tensor finite. Raises NonFiniteLoss naming the
    first that is not."""
    monitor.flush()
    for module, what in ((model, "weights"), (ema.module, "EMA weights")):
        key = first_non_finite(module.state_dict())
        if key is not None:
            raise NonFiniteLoss(f"the {what} hold non-finite values ({key}) after the last optimizer step; stopping "
                                f"without saving them. {RESUME_ADVICE}")


def train_one_epoch(execution, ema, tokenizer, loader, optimizer, scaler, epoch, args, device, context, writer,
                    logger, monitor: TrainingMonitor, start_step=0, steps_per_epoch=None, after_optimizer_step=None):
    """One pass over `loader` with the model of `execution` (`util.execution.wrap`); returns the epoch's averages.

    Gradients of `gradient_accumulation_steps` micro-batches are summed (Parity: the original does not
    divide the loss), gradients are synchronised only on the last micro-batch, then clip, step, EMA update.
    A resumed epoch starts at batch `start_step` of `steps_per_epoch` (the loader yields the rest);
    `after_optimizer_step(batches_done)` runs after every optimizer step (mid-epoch checkpoints). The loss is
    read from the device every `PRINT_FREQ` steps (`monitor`), when the progress line is printed.
    """
    model = execution.module
    execution.train_module.train()
    metrics = MetricLogger(print_fn=logger.info)
    metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
    for name in ("img/s", "tflop/s"):
        metrics.add_meter(name, SmoothedValue(window_size=1, fmt="{value:.3g}"))
    if monitor.peak:
        metrics.add_meter("mfu", SmoothedValue(window_size=1, fmt="{value:.1%}"))
    schedule = LrSchedule(args.lr, args.warmup_epochs, args.epochs, args.lr_schedule, args.min_lr)
    accumulation = args.gradient_accumulation_steps
    steps = steps_per_epoch or len(loader)
    optimizer.zero_grad(set_to_none=True)
    first_step_started = time.time() if execution.compiled and not execution.first_step_done else None
    for step, batch in enumerate(metrics.log_every(loader, PRINT_FREQ, f"Epoch: [{epoch}]"), start=start_step):
        lr = adjust_learning_rate(optimizer, step / steps + epoch, schedule)
        latents, labels = batch_to_latents(batch, tokenizer, device, args.use_cached)
        sync = (step + 1) % accumulation == 0 or step + 1 == steps
        with execution.grad_sync(sync):
            with context():
                loss = execution.train_module(latents, labels)
            (scaler.scale(loss) if scaler.is_enabled() else loss).backward()
        monitor.add(loss, epoch, step)
        if sync:
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model, args.ema_rate)
        if first_step_started is not None:
            seconds = time.time() - first_step_started
            logger.info(f"--compile: the first step, compilation included, took {seconds:.1f} s")
            execution.first_step_done, first_step_started = True, None
        if (step - start_step) % PRINT_FREQ == 0 or step + 1 == steps:  # when log_every prints
            monitor.flush()
            report(monitor.take(), metrics, writer, lr, int((step / steps + epoch) * 1000))
        if sync and after_optimizer_step is not None:
            after_optimizer_step(step + 1)
    return {name: meter.global_avg for name, meter in metrics.meters.items()}


def report(windows: List[Window], metrics: MetricLogger, writer, lr: float, epoch_1000x: int) -> None:
    """Windows of steps into the progress line's meters and tensorboard."""
    for window in windows:
        metrics.meters["loss"].update(window.loss, n=window.steps)
        metrics.meters["img/s"].update(window.throughput.images_per_second, n=window.steps)
        metrics.meters["tflop/s"].update(window.throughput.flops_per_second / 1e12, n=window.steps)
        writer.add_scalar("train_loss", window.loss, epoch_1000x)
        writer.add_scalar("images_per_second", window.throughput.images_per_second, epoch_1000x)
        if window.throughput.mfu is not None:
            metrics.meters["mfu"].update(window.throughput.mfu, n=window.steps)
            writer.add_scalar("mfu", window.throughput.mfu, epoch_1000x)
    metrics.meters["lr"].update(lr)
    writer.add_scalar("lr", lr, epoch_1000x)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluation_of(net, tokenizer, args, epoch_label: str, cfg, use_ema: bool, source: str) -> Evaluation:
    """The `Evaluation` (`util.eval.layout`) of `net`'s weights under the run's settings."""
    return Evaluation(
        weights_digest=parameter_digest(net), tokenizer_digest=parameter_digest(tokenizer), ema=use_ema,
        checkpoint=source, epoch=epoch_label, seed=args.seed, model=args.model, mrar=args.mrar,
        patch_size=args.patch_size, img_size=args.img_size, class_num=args.class_num, tokenizer=args.tokenizer,
        vae_stride=args.vae_stride, vae_embed_dim=args.vae_embed_dim, sampler=args.sampler,
        num_sampling_steps=args.num_sampling_steps, cfg=cfg, scale_0=args.scale_0, scale_1=args.scale_1,
        cfg_interval=args.cfg_interval, num_images=args.num_images, precision=args.precision,
        standalone=args.evaluate)


@torch.no_grad()
def generate_images(net, tokenizer, folder, args, cfg, device, context, logger) -> int:
    """Write `{index:05d}.png` for every index < num_images; returns how many of this rank's images, made now or
    found complete, are one colour all over.

    Batches of `eval_bsz` consecutive indices are dealt round-robin to the ranks; a batch whose PNGs all
    exist and decode at the right size is skipped, so an interrupted run resumes without duplicating or
    skipping images, and a truncated image is made again. PNGs are encoded and written by `PNG_WRITERS` threads
    while the next batch is generated (each atomically: a kill leaves complete PNGs only); at most two batches
    wait for them.
    """
    num_batches = math.ceil(args.num_images / args.eval_bsz)
    mine = range(dist.get_rank(), num_batches, dist.get_world_size())
    generated, timed, seconds, constant = 0, 0, 0.0, 0
    progress = tqdm(mine, desc="generating", disable=not dist.is_main_process(), dynamic_ncols=True)
    writing: List[List[Future]] = []  # the PNG writes of the batches still in flight
    with ThreadPoolExecutor(max_workers=PNG_WRITERS, thread_name_prefix="png") as writers:
        for batch in progress:
            indices = range(batch * args.eval_bsz, min((batch + 1) * args.eval_bsz, args.num_images))
            paths = [image_path(folder, index) for index in indices]
            if all(is_complete_png(path, args.img_size) for path in paths):
                constant += sum(map(is_constant_png, paths))
                continue
            started = time.time()
            labels = torch.tensor([image_class(i, args.num_images, args.class_num) for i in indices], device=device)
            noise = image_noise(args.seed, indices)
            with context():
                latents = net.samples(labels, args.num_sampling_steps, cfg=cfg, sampler=args.sampler,
                                      scale_0=args.scale_0, scale_1=args.scale_1, generator=noise,
                                      cfg_interval=args.cfg_interval)
            pixels = to_uint8(decode_images(tokenizer, latents, args.precision, device))  # [B, H, W, 3]
            constant += constant_images(pixels)
            writing.append([writers.submit(save_png, path, image) for path, image in zip(paths, pixels)])
            while len(writing) > 2:
                wait_for(writing.pop(0))
            if generated:  # the first batch includes warm-up; time the rest, as the original
                seconds += time.time() - started
                timed += len(paths)
            generated += len(paths)
        for writes in writing:
            wait_for(writes)
    if timed:
        logger.info(f"rank {dist.get_rank()}: {seconds / timed:.4f} s per image")
    return constant


def wait_for(writes: List[Future]) -> None:
    """Wait for PNG writes, raising the first write's error (a full disk) in the generating thread."""
    for write in writes:
        write.result()


def build_metrics(args):
    """The `--metrics` of the run, each checked before generation: (usable metrics, {name: why skipped}).

    A metric whose files are missing is skipped with its message, or raises with `--require_metrics`.
    """
    settings = MetricSettings(img_size=args.img_size, num_images=args.num_images, class_num=args.class_num,
                              fid_stats=args.fid_stats, inception_weights=args.inception_weights,
                              ref_images=args.ref_images, prc_weights=args.prc_weights, digits_judge=args.digits_judge)
    metrics, skipped = [], {}
    for name in args.metrics:
        metric = EVAL_METRICS[name](settings)
        try:
            metric.check()
        except MissingMetricFile as missing:
            if args.require_metrics:
                raise
            skipped[name] = str(missing)
            continue
        metrics.append(metric)
    return metrics, skipped


def evaluate(model, ema, tokenizer, args, epoch_label, device, context, writer, logger, cfg, use_ema=True,
             source=""):
    """Generate `num_images` class-balanced images, then run the `--metrics` on rank 0. Returns the record.

    `source` names where the weights came from (a checkpoint path) for the folder's manifest.
    """
    metrics, skipped = build_metrics(args)
    net = ema.module if use_ema else model
    was_training = net.training
    net.eval()
    evaluation = evaluation_of(net, tokenizer, args, epoch_label, cfg, use_ema, source)
    folder = evaluation.folder(args.output_dir)
    if dist.is_main_process():
        os.makedirs(folder, exist_ok=True)
        claim_folder(folder, evaluation.identity(), {"source": source, "epoch": epoch_label, "args": vars(args)})
        removed = remove_stale_temp_files(folder)[0]
        removed += remove_stale_temp_files(*os.path.split(grid_path(folder)))[0]  # its grid's, beside it
        if removed:
            logger.info(f"removed {removed} temporary file(s) of an interrupted evaluation in {folder}")
    dist.barrier()
    settings = evaluation.record()
    for metric in metrics:
        settings.update(metric.sources())
    logger.info(f"evaluating into {folder}; settings that move the scores: "
                + ", ".join(f"{key} {value}" for key, value in settings.items()))
    started = time.time()
    constant = int(dist.all_reduce_sum([generate_images(net, tokenizer, folder, args, cfg, device, context,
                                                        logger)])[0])
    net.train(was_training)
    dist.barrier()
    SHARED_INCEPTION.extract(folder, device)  # every rank's share of the Inception features, for rank 0

    record = {**settings, "folder": folder, "generation_minutes": (time.time() - started) / 60,
              "constant_images": constant}
    if constant:
        logger.warning(f"{constant} of {args.num_images} images in {folder} are one colour all over: the model "
                       "samples nothing (diverged or untrained weights?); their scores mean little")
    if dist.is_main_process():
        record["grid"] = write_evaluation_grid(folder, args.num_images, args.class_num)
        if args.save_npz:
            record["npz"] = folder + ".npz"
            write_adm_npz(folder, record["npz"])
        postfix = ("_ema" if use_ema else "") + ("" if cfg == 1.0 else f"_cfg{cfg}") + f"_{args.sampler}"
        step = int(epoch_label) if epoch_label.isdigit() else 0
        for metric in metrics:
            try:
                scores = metric.compute(folder, device)
            except (OSError, ValueError, RuntimeError) as error:
                raise RunError(f"metric {metric.name} over {folder} failed: {error}") from error
            record.update(scores)
            for key, value in scores.items():
                if isinstance(value, float):
                    writer.add_scalar(f"{key}{postfix}", value, step)
            logger.info(f"{metric.name}: " + ", ".join(f"{key} {value:.4f}" for key, value in scores.items()
                                                      if isinstance(value, float)))
        for name, why in skipped.items():
            record.setdefault("metrics_skipped", {})[name] = why
            logger.warning(f"images kept in {folder}; {name} skipped: {why}")
        append_json_record(os.path.join(args.output_dir, "metrics.json"), record)
    dist.wait_for_main_process()
    return record


# An evaluation's grid: up to this many classes spread over the class range, this many images of each.
GRID_CLASSES = 8
GRID_PER_CLASS = 4


def grid_path(folder: str) -> str:
    """An evaluation folder's grid, beside it (inside, it would count as a generated image)."""
    return folder + "_grid.png"


def write_evaluation_grid(folder: str, num_images: int, class_num: int) -> str:
    """`<folder>_grid.png`: a row per class of `GRID_CLASSES` spread over the class range, its first
    `GRID_PER_CLASS` images, zoomed for small images (`util.eval.images.zoomed_grid`); written atomically once the
    images exist (rank 0). Returns its path."""
    grid = evaluation_grid(folder, num_images, class_num, spread_classes(GRID_CLASSES, class_num), GRID_PER_CLASS)
    path = grid_path(folder)
    atomic_write(path, lambda handle: grid.save(handle, format="PNG"), durable=False)
    return path


# ---------------------------------------------------------------------------------------------- previews
PREVIEW_SAMPLER = "euler"  # deterministic and cheap: a preview shows progress, not paper numbers


def spread_classes(count: int, class_num: int) -> list:
    """`count` classes (at most `class_num`) spread evenly over the class range, first and last included."""
    count = min(count, class_num)
    return [round(i * (class_num - 1) / max(count - 1, 1)) for i in range(count)]


def preview_classes(args) -> list:
    """`--preview_classes` spread evenly over the class range (always the same ones during a run)."""
    return spread_classes(args.preview_classes, args.class_num)


@torch.no_grad()
def preview(net, tokenizer, args, epoch, device, context, writer) -> str:
    """A fixed-seed grid from `net` (the EMA weights): one row per preview class, `--preview_per_class` columns,
    `--preview_steps` Euler steps. Rank 0 writes `<output_dir>/previews/epoch<E>.png` and a tensorboard image."""
    path = os.path.join(args.output_dir, "previews", f"epoch{epoch:04d}.png")
    if not dist.is_main_process():
        return path
    was_training = net.training
    net.eval()
    labels = torch.tensor([c for c in preview_classes(args) for _ in range(args.preview_per_class)], device=device)
    noise = image_noise(args.seed, range(len(labels)))
    with context():
        latents = net.samples(labels, args.preview_steps, cfg=args.cfg, sampler=PREVIEW_SAMPLER, generator=noise)
    images = decode_images(tokenizer, latents, args.precision, device)  # [B, 3, H, W]
    net.train(was_training)
    grid = zoomed_grid(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2), args.preview_per_class)
    pixels = np.asarray(grid)  # [H', W', 3]
    save_png(path, pixels)
    writer.add_image("preview", pixels, epoch)
    return path


# ---------------------------------------------------------------------------------------------- caching
@torch.no_grad()
def cache_latents(tokenizer, loader, device, writer, logger) -> int:
    """Hand the posterior moments of every image and of its horizontal flip to `writer`
    (`util.data.latent_cache`: `add(paths, moments, moments_flip)`, then `close()`); returns the count cached."""
    cached = 0
    metrics = MetricLogger(print_fn=logger.info)
    for images, _, paths in metrics.log_every(loader, PRINT_FREQ, "Caching:"):
        images = images.to(device, non_blocking=True)
        moments = tokenizer.encode(images).parameters  # [B, 2C, h, w]
        moments_flip = tokenizer.encode(images.flip(dims=[3])).parameters  # [B, 2C, h, w]
        writer.add(paths, moments.cpu(), moments_flip.cpu())
        cached += len(paths)
    writer.close()
    return cached
