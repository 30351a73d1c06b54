"""Pre-compute the tokenizer's posterior moments (and those of the horizontal flip) of an ImageFolder, sharded over
the ranks of `torchrun`, into the layout that `main.py --use_cached --cached_path` reads.

Images get the ADM centre crop (no random crop): training on cached latents sees centre crops, flipped at
random at load time. The tokenizer, data and distributed flags are `main.py`'s (`util.settings`).
"""
import argparse
import os

import torch

from engine_transdiff import cache_latents
from models.tokenizers import build_tokenizer
from util import distributed as dist
from util.crops import cache_transform
from util.datasets import ImageFolderWithChecks, cached_latent_path
from util.logger import create_logger
from util.settings import add_data_args, add_distributed_args, add_legacy_args, add_tokenizer_args
from util.settings import resolve_device as resolve_settings


class ImageFolderWithPaths(ImageFolderWithChecks):
    """(image, label, path) triples, so the writer knows where each image's moments go."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, self.samples[index][0]


def get_args_parser():
    parser = argparse.ArgumentParser("Cache TransDiff tokenizer latents")
    parser.add_argument("--batch_size", default=128, type=int, help="per process")
    add_tokenizer_args(parser)
    add_data_args(parser, cache=True)
    add_distributed_args(parser)
    add_legacy_args(parser)
    return parser


def main(args):
    info = dist.init_distributed(args.device, args.dist_on_itp, args.dist_url, args.dist_timeout)
    logger = create_logger(None)
    tokenizer = build_tokenizer(args.tokenizer, vae_path=args.vae_path, vae_embed_dim=args.vae_embed_dim,
                                vae_stride=args.vae_stride).to(info.device)
    image_root = os.path.join(args.data_path, "train")
    dataset = ImageFolderWithPaths(image_root, transform=cache_transform(args.img_size), skip_corrupt=args.skip_corrupt)
    # Resumable: images whose moments already exist are not encoded again.
    dataset.samples = [s for s in dataset.samples
                       if not os.path.exists(cached_latent_path(args.cached_path, image_root, s[0]))]
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                                  shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                                         num_workers=args.num_workers, drop_last=False,
                                         pin_memory=args.pin_mem and info.device.type == "cuda")
    written = cache_latents(tokenizer, loader, info.device, args.cached_path, image_root, logger)
    logger.info(f"rank {dist.get_rank()}: cached {written} images into {args.cached_path}")
    dist.barrier()
    dist.cleanup()


def cli(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        resolve_settings(args)
        main(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"main_cache.py: error: {error}\n")


if __name__ == "__main__":
    cli()
