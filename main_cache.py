"""Pre-compute the tokenizer's posterior moments (and those of the horizontal flip) of an ImageFolder, sharded over
the ranks of `torchrun`, into a latent cache that `main.py --use_cached --cached_path` reads (with or without
--mrar). The layouts, sharded (the default: a few memory-mapped `.npy` shards and an index) and per-image `.npz`
files (`--cache_format files`), are `util.data.latent_cache`'s.

Images get the ADM centre crop (no random crop): training on cached latents sees centre crops, flipped at
random at load time. The tokenizer, data and distributed flags are `main.py`'s (`util.settings`).

Resumable and race-free: rank 0 decides once which images still need caching (and removes what an interrupted run
left unfinished) before any rank writes; every rank checks that it lists the same images and writes only files of
its own; the run ends by checking the cache against the image folder, failing on any gap, and (sharded) by writing
the index only then.
"""
import argparse
import hashlib
import os

import torch

from engine_transdiff import cache_latents
from models.tokenizers import build_tokenizer
from util import distributed as dist
from util.data.crops import cache_transform
from util.data.datasets import CACHE_CLASSES, ImageFolderWithChecks
from util.data.latent_cache import CACHE_FORMATS, SHARD_IMAGES, FileCacheWriter, ShardedCacheWriter
from util.errors import RunError, run_cli
from util.io import write_json
from util.logger import create_logger
from util.settings import (
    HelpFormatter,
    SettingsError,
    add_data_args,
    add_distributed_args,
    add_legacy_args,
    add_tokenizer_args,
    loader_workers,
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
    parser.add_argument("--cache_format", default="sharded", choices=CACHE_FORMATS,
                        help="sharded: memory-mapped .npy shards and index.json; files: one .npz per image (the "
                             "original's layout)")
    parser.add_argument("--shard_images", default=SHARD_IMAGES, type=int,
                        help="images per shard (sharded); each rank holds one shard in memory until it is written")
    add_tokenizer_args(parser)
    add_data_args(parser, cache=True)
    add_distributed_args(parser)
    add_legacy_args(parser)
    return parser


def cache_writer(cache_format: str, cached_path: str, image_root: str, shard_images: int):
    """This rank's writer of the chosen layout (`util.data.latent_cache`)."""
    if shard_images < 1:
        raise SettingsError(f"--shard_images must be at least 1, got {shard_images}")
    if cache_format == "files":
        return FileCacheWriter(cached_path, image_root)
    return ShardedCacheWriter(cached_path, image_root, shard_images)


def prepare_cache_folder(cached_path, dataset, writer, logger):
    """Rank 0, before anyone writes: the class record, and nothing an interrupted run left unfinished."""
    os.makedirs(cached_path, exist_ok=True)
    write_json(os.path.join(cached_path, CACHE_CLASSES), dataset.classes)
    removed = writer.clean()
    if removed:
        logger.info(f"removed {removed} unfinished file(s) of an interrupted caching run")


def main(args):
    image_root = os.path.join(args.data_path, "train")
    writer = cache_writer(args.cache_format, args.cached_path, image_root, args.shard_images)
    info = dist.init_distributed(args.device, args.dist_on_itp, args.dist_url, args.dist_timeout)
    logger = create_logger(None)
    tokenizer = build_tokenizer(args.tokenizer, vae_path=args.vae_path, vae_embed_dim=args.vae_embed_dim,
                                vae_stride=args.vae_stride).to(info.device)
    dataset = ImageFolderWithPaths(image_root, transform=cache_transform(args.img_size), skip_corrupt=args.skip_corrupt)
    listing = hashlib.sha256("\n".join(path for path, _ in dataset.samples).encode()).hexdigest()
    if len(set(dist.all_gather_object(listing))) != 1:
        raise RunError(f"the ranks list different images under {image_root}: is the folder changing?")
    todo = None
    if dist.is_main_process():
        prepare_cache_folder(args.cached_path, dataset, writer, logger)
        todo = writer.uncached(dataset.samples)
        logger.info(f"{len(todo)} of {len(dataset.samples)} images to cache")
    dist.wait_for_main_process()  # listing the cache can take rank 0 a long time on a network file system
    todo = dist.broadcast_object(todo)  # decided once, before any rank writes
    listed = dataset.samples  # the whole image folder, scanned once
    dataset.samples = [listed[i] for i in todo[dist.get_rank()::dist.get_world_size()]]  # this rank's share
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=loader_workers(args.num_workers, logger),
                                         pin_memory=args.pin_mem and info.device.type == "cuda")
    cached = cache_latents(tokenizer, loader, info.device, writer, logger)
    logger.info(f"rank {dist.get_rank()}: cached {cached} images into {args.cached_path}")
    dist.barrier()
    try:
        if dist.is_main_process():
            writer.finish(listed)
            logger.info(f"{args.cached_path} holds all {len(listed)} images of {image_root}")
    finally:
        dist.cleanup()


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    run_cli("main_cache.py", lambda: main(resolve_settings(args)))


if __name__ == "__main__":
    cli()
