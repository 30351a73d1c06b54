"""Pre-compute the KL-16 posterior moments (and those of the horizontal flip) of an ImageFolder, sharded over
the ranks of `torchrun`, into the layout that `main.py --use_cached --cached_path` reads.

Images get the ADM centre crop (no random crop): training on cached latents sees centre crops, flipped at
random at load time.
"""
import argparse
import os

import torch

from engine_transdiff import cache_latents
from models.tokenizers import TOKENIZERS, build_tokenizer
from util import distributed as dist
from util.crops import cache_transform
from util.datasets import ImageFolderWithChecks, cached_latent_path
from util.logger import create_logger


class ImageFolderWithPaths(ImageFolderWithChecks):
    """(image, label, path) triples, so the writer knows where each image's moments go."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, self.samples[index][0]


def get_args_parser():
    parser = argparse.ArgumentParser("Cache TransDiff VAE latents")
    parser.add_argument("--batch_size", default=128, type=int, help="per process")
    parser.add_argument("--img_size", default=256, type=int)
    parser.add_argument("--tokenizer", default="kl16", choices=TOKENIZERS)
    parser.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt")
    parser.add_argument("--vae_embed_dim", default=16, type=int)
    parser.add_argument("--vae_stride", default=16, type=int)
    parser.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root holding train/")
    parser.add_argument("--cached_path", required=True, help="output folder")
    parser.add_argument("--skip_corrupt", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true", default=True)
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.add_argument("--world_size", default=1, type=int)
    parser.add_argument("--local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://")
    return parser


def main(args):
    dist.init_distributed(args)
    logger = create_logger(None)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("main_cache.py: error: --device cuda was asked for but CUDA is not available")
        device = torch.device("cuda", dist.get_local_rank())
    tokenizer = build_tokenizer(args.tokenizer, vae_path=args.vae_path, vae_embed_dim=args.vae_embed_dim,
                                vae_stride=args.vae_stride).to(device)
    image_root = os.path.join(args.data_path, "train")
    dataset = ImageFolderWithPaths(image_root, transform=cache_transform(args.img_size), skip_corrupt=args.skip_corrupt)
    # Resumable: images whose moments already exist are not encoded again.
    dataset.samples = [s for s in dataset.samples
                       if not os.path.exists(cached_latent_path(args.cached_path, image_root, s[0]))]
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                                  shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                                         num_workers=args.num_workers, drop_last=False,
                                         pin_memory=args.pin_mem and device.type == "cuda")
    written = cache_latents(tokenizer, loader, device, args.cached_path, image_root, logger)
    logger.info(f"rank {dist.get_rank()}: cached {written} images into {args.cached_path}")
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
