"""Judge TransDiff samples of the digits dataset with a small classifier trained on the real digits.

Reads the evaluation output ``{index:05d}.png`` (class-major order), compares it with the held-out real
digits of ``--data_root`` and prints the scores of ``digits.scores.score_samples`` as JSON::

    python tools/digits_metrics.py --samples DIR --num_images 1000 --data_root data/digits \
        --classifier data/digits/classifier.pt --out metrics.json

Also runnable as ``python -m tools.digits_metrics``. A missing digits export under ``--data_root`` is
written first (``--img_size``), and a missing ``--classifier`` is trained first (seconds on a CPU). The same
scores, less the reference ones, come from ``main.py --evaluate --metrics digits`` (``digits.metric``).
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Imported after the path fix above, which a run as a script needs.
from digits.data import export_digits, read_export_manifest
from digits.judge import load_digits_classifier, train_digits_classifier
from digits.scores import score_samples
from util.errors import run_cli
from util.eval.images import read_generated_images, read_image_folder
from util.io import write_json


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="folder of generated {index:05d}.png images")
    parser.add_argument("--num_images", type=int, required=True, help="number of generated images to read")
    parser.add_argument("--class_num", type=int, default=10, help="classes; num_images must be a multiple")
    parser.add_argument("--data_root", required=True, help="digits export (train/ and val/); written if missing")
    parser.add_argument("--classifier", required=True, help="judge checkpoint; trained on data_root if missing")
    parser.add_argument("--img_size", type=int, default=32, help="image side (pixels) for a new export and judge")
    parser.add_argument("--seed", type=int, default=0, help="seed of a new export split and judge training")
    parser.add_argument("--out", default=None, help="also write the metrics JSON to this file")
    return parser


def main(argv=None) -> dict:
    """Score the samples and return the metrics dict (also printed, and written to ``--out``)."""
    args = get_args_parser().parse_args(argv)
    data_root = Path(args.data_root)
    if read_export_manifest(data_root) is None:
        export_digits(data_root, img_size=args.img_size, seed=args.seed)
    classifier_path = Path(args.classifier)
    if not classifier_path.is_file():
        report = train_digits_classifier(data_root, classifier_path, img_size=args.img_size, seed=args.seed)
        print(f"trained {classifier_path}: held-out accuracy {report['val_accuracy']:.4f}", file=sys.stderr)
    classifier = load_digits_classifier(classifier_path)

    images, labels = read_generated_images(args.samples, args.num_images, args.class_num)
    reference_images, reference_labels = read_image_folder(data_root / "val")
    metrics = score_samples(classifier, images, labels, reference_images, reference_labels)
    metrics.update(
        samples=str(args.samples),
        classifier=str(classifier_path),
        classifier_val_accuracy=classifier.val_accuracy,
    )
    print(json.dumps(metrics, indent=2))
    if args.out is not None:
        write_json(args.out, metrics)
    return metrics


if __name__ == "__main__":
    run_cli("digits_metrics.py", main)
