"""The digits judge as an evaluation metric (``--metrics digits``, `util.eval.registry`).

It scores an evaluation folder ``{index:05d}.png`` (classes in `util.eval.layout` order) with a judge trained
by ``digits.judge.train_digits_classifier`` against an ImageFolder split of real digits, and reports the
headline scores of ``digits.scores.score_samples``.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from digits.judge import load_digits_classifier
from digits.scores import score_samples
from util.eval.fidelity import MissingMetricFile
from util.eval.images import read_generated_images, read_image_folder
from util.io import file_source

HEADLINE_SCORES = ("class_consistency", "frechet_distance", "within_class_spread", "spread_ratio",
                   "per_class_accuracy", "num_samples")
_HOW_TO_GET_JUDGE = ("Train one on a digits export with `python tools/digits_metrics.py ... --classifier <file>` "
                     "(it trains a missing one) or digits.judge.train_digits_classifier; quickstart.py writes "
                     "<out>/digits/judge.pt. Pass it as --digits_judge.")
_HOW_TO_GET_REFERENCE = ("Export the real digits with digits.data.export_digits(<root>) (quickstart.py writes "
                         "<out>/digits) and pass an ImageFolder split such as <root>/val as --ref_images.")


class DigitsJudge:
    """Class consistency, Frechet distance and within-class spread of digits samples under a judge classifier.

    Args:
        judge_path: checkpoint written by ``digits.judge.train_digits_classifier`` (``--digits_judge``).
        ref_images: ImageFolder split of real images, e.g. ``<digits export>/val`` (``--ref_images``).
        num_images: generated images to read from the folder (``--num_images``).
        class_num: classes of the generation, in class-major order (``--class_num``).
    """

    name = "digits"

    def __init__(self, judge_path: str | None, ref_images: str | None, num_images: int, class_num: int):
        self.judge_path = judge_path
        self.ref_images = ref_images
        self.num_images = num_images
        self.class_num = class_num
        self._judge = None
        self._reference = None  # (uint8 [M, 3, H, W], int64 [M])

    def check(self) -> None:
        """Load the judge and the reference images; raise MissingMetricFile or ValueError naming a bad file."""
        if self.judge_path is None or not os.path.isfile(self.judge_path):
            raise MissingMetricFile("digits judge file", self.judge_path or "<none: pass --digits_judge>",
                                    _HOW_TO_GET_JUDGE)
        if self.ref_images is None or not os.path.isdir(self.ref_images):
            raise MissingMetricFile("folder of real digits", self.ref_images or "<none: pass --ref_images>",
                                    _HOW_TO_GET_REFERENCE)
        judge = load_digits_classifier(self.judge_path)
        if judge.config["num_classes"] != self.class_num:
            raise ValueError(f"digits judge {self.judge_path} knows {judge.config['num_classes']} classes, "
                             f"the evaluation generates {self.class_num} (--class_num)")
        try:
            reference = read_image_folder(self.ref_images)
        except FileNotFoundError as error:  # a folder without class folders or images
            raise MissingMetricFile("ImageFolder of real digits", self.ref_images,
                                    f"{error}. {_HOW_TO_GET_REFERENCE}") from error
        self._judge, self._reference = judge, reference

    def sources(self) -> Dict[str, str]:
        """The judge file (with its sha256) and the real digits it compares against."""
        return {**file_source("digits_judge", self.judge_path), "ref_images": os.path.abspath(self.ref_images)}

    def compute(self, folder: str, device: torch.device) -> Dict[str, Any]:
        """Headline scores (``HEADLINE_SCORES``) of the ``num_images`` samples in ``folder``."""
        if self._judge is None:
            self.check()
        images, labels = read_generated_images(folder, self.num_images, self.class_num)  # [N, 3, H, W], [N]
        scores = score_samples(self._judge.to(device), images, labels, *self._reference)
        return {key: scores[key] for key in HEADLINE_SCORES}
