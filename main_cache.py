"""Pre-compute the tokenizer's posterior moments (and those of the horizontal flip) of an ImageFolder, sharded over
the ranks of `torchrun`, into the layout that `main.py --use_cached --cached_path` reads.

Images get the ADM centre crop (no random crop): training on cached latents sees centre crops, flipped at
random at load time. The tokenizer, data and distributed flags are `main.py`'s (`util.settings`).

Resumable and race-free: rank 0 decides once which images still need caching (and removes the temporary files
of an interrupted run) before any rank writes; every rank checks that it lists the same images; the run ends by
counting the cache against the image folder and fails on any gap.
"""
import argparse
import hashlib
import os

import torch

from engine_transdiff import cache_latents
from models.tokenizers import build_tokenizer
from util import distributed as dist
from util.data.crops import cache_transform
from util.data.datasets import CACHE_CLASSES, ImageFolderWithChecks, cached_latent_path
from util.errors import RunError, run_cli
from util.io import remove_stale_temp_files, write_json
from util.logger import create_logger
from util.settings import (
    HelpFormatter,
    add_data_args,
    add_distributed_args,
    add_legacy_args,
    add_tokenizer_args,
    available_cpus,
    capped_workers,
)
from util.settings import resolve_device as resolve_settings


class ImageFolderWithPaths(ImageFolderWithChecks):
    """(image, label, path) triples, so the writer knows where each image's moments go."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, self.samples[index][0]


def get_args_parser():
    parser = argparse.ArgumentParser("Cache TransDiff tokenizer latents", formatter_class=HelpFormatter)
    parser.add_argument("--batch_size", default=128, type=int, help="per process")
    add_tokenizer_args(parser)
    add_data_args(parser, cache=True)
    add_distributed_args(parser)
    add_legacy_args(parser)
    return parser


def uncached(samples, cached_path, image_root):
    """Indices of the (path, label) samples without a cache file."""
    return [i for i, (path, _) in enumerate(samples)
            if not os.path.exists(cached_latent_path(cached_path, image_root, path))]


def prepare_cache_folder(cached_path, dataset, logger):
    """Rank 0, before anyone writes: the class record, and no temporary files of an interrupted run."""
    os.makedirs(cached_path, exist_ok=True)
    write_json(os.path.join(cached_path, CACHE_CLASSES), dataset.classes)
    removed = 0
    for folder, _, _ in os.walk(cached_path):
        removed += remove_stale_temp_files(folder)[0]
    if removed:
        logger.info(f"removed {removed} temporary file(s) of an interrupted caching run")


def main(args):
    info = dist.init_distributed(args.device, args.dist_on_itp, args.dist_url, args.dist_timeout)
    logger = create_logger(None)
    tokenizer = build_tokenizer(args.tokenizer, vae_path=args.vae_path, vae_embed_dim=args.vae_embed_dim,
                                vae_stride=args.vae_stride).to(info.device)
    image_root = os.path.join(args.data_path, "train")
    dataset = ImageFolderWithPaths(image_root, transform=cache_transform(args.img_size), skip_corrupt=args.skip_corrupt)
    listing = hashlib.sha256("\n".join(path for path, _ in dataset.samples).encode()).hexdigest()
    if len(set(dist.all_gather_object(listing))) != 1:
        raise RunError(f"the ranks list different images under {image_root}: is the folder changing?")
    todo = None
    if dist.is_main_process():
        prepare_cache_folder(args.cached_path, dataset, logger)
        todo = uncached(dataset.samples, args.cached_path, image_root)
        logger.info(f"{len(todo)} of {len(dataset.samples)} images to cache")
    dist.wait_for_main_process()  # listing the cache can take rank 0 a long time on a network file system
    todo = dist.broadcast_object(todo)  # decided once, before any rank writes
    listed = dataset.samples  # the whole image folder, scanned once
    dataset.samples = [listed[i] for i in todo]
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                                  shuffle=False)
    workers, note = capped_workers(args.num_workers, available_cpus())
    if note:
        logger.info(note)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                                         num_workers=workers, drop_last=False,
                                         pin_memory=args.pin_mem and info.device.type == "cuda")
    written = cache_latents(tokenizer, loader, info.device, args.cached_path, image_root, logger)
    logger.info(f"rank {dist.get_rank()}: cached {written} images into {args.cached_path}")
    dist.barrier()
    try:
        if dist.is_main_process():
            missing = uncached(listed, args.cached_path, image_root)
            if missing:
                raise RunError(f"{len(missing)} of {len(listed)} images of {image_root} have no cache file "
                               f"in {args.cached_path}, e.g. {listed[missing[0]][0]}; rerun main_cache.py")
            logger.info(f"{args.cached_path} holds all {len(listed)} images of {image_root}")
    finally:
        dist.cleanup()


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_cli("main_cache.py", lambda: main(resolve_settings(args)))


if __name__ == "__main__":
    cli()
