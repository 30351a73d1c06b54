"""Compute FID reference statistics (``mu``, ``sigma``) for a custom dataset.

The statistics use the same torch-fidelity Inception network and code as evaluation (``util/eval/fidelity.py``),
so ``--fid_stats`` files made here are comparable with generated samples scored by ``main.py``::

    python tools/make_fid_stats.py --image_dir data/train --out fid_stats/custom.npz --resize 256
    python -m tools.make_fid_stats --image_dir samples/ --out fid_stats/custom.npz --device cpu

``--image_dir`` is searched recursively for png/jpg/jpeg files, so an ImageFolder root with one
sub-folder per class works. Images are batched, so they must share one size: pass ``--resize N`` to
center-crop and resize every image to ``N x N`` (ADM's ``center_crop_arr``, as used to preprocess ImageNet
for training and for ADM's reference batches) on the fly. The output holds float32 ``mu`` [2048] and
float64 ``sigma`` [2048, 2048], like ADM's and MAR's reference files.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/make_fid_stats.py`: make `util` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from util.errors import run_cli
from util.eval.fidelity import (
    BATCH_SIZE,
    FEATURE_FID,
    inception_features,
    resolve_inception_weights,
    save_reference_statistics,
    statistics_from_features,
)


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the tool."""
    parser = argparse.ArgumentParser(description="Compute FID reference statistics (mu, sigma) of an image folder.")
    parser.add_argument("--image_dir", required=True,
                        help="folder of png/jpg/jpeg images, searched recursively (an ImageFolder root works)")
    parser.add_argument("--out", required=True, help="output .npz with mu and sigma, e.g. fid_stats/custom.npz")
    parser.add_argument("--inception_weights", default=None,
                        help="torch-fidelity Inception weights file (default: torch-hub's cache; never downloaded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for the Inception network (default: cuda if available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="images per Inception forward")
    parser.add_argument("--resize", type=int, default=None,
                        help="center-crop and resize every image to this square size (pixels) first; "
                             "needed when image sizes differ (default: use images as they are)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="image decoding workers (default: torch-fidelity's min(4, 2 * cpu_count))")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Compute and save the statistics; return the number of images used."""
    args = build_parser().parse_args(argv)
    weights = resolve_inception_weights(args.inception_weights)
    features = inception_features(args.image_dir, args.device, args.batch_size, weights, verbose=not args.quiet,
                                  num_workers=args.num_workers, recursive=True, resize=args.resize,
                                  features=(FEATURE_FID,))[FEATURE_FID]  # [N, 2048]
    stats = statistics_from_features(features)
    save_reference_statistics(args.out, stats["mu"], stats["sigma"])
    print(f"wrote {args.out}: mu {tuple(stats['mu'].shape)}, sigma {tuple(stats['sigma'].shape)} "
          f"from {features.shape[0]} images in {args.image_dir}")
    return features.shape[0]


if __name__ == "__main__":
    run_cli("make_fid_stats.py", main)
