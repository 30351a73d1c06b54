"""The metrics an evaluation runs over its folder of generated images: one interface, one registry.

A metric is built from the run's settings (`EVAL_METRICS[name](args)`), checks the files it needs before any
image is generated (`check`, which raises `MissingMetricFile` naming an absent file), and scores a finished
folder (`compute(folder, device) -> {key: value}`); its keys go into the evaluation record (`metrics.json`),
and its float values to tensorboard. `--metrics` takes names of this registry.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Protocol

import torch

from util.metrics import (
    MissingMetricFile,
    compute_fid_is,
    default_fid_stats_path,
    load_inception,
    load_reference_statistics,
    resolve_inception_weights,
)


class EvalMetric(Protocol):
    name: str

    def check(self) -> None:
        """Load and validate every file the metric reads; raise MissingMetricFile (or ValueError) if unusable."""

    def compute(self, folder: str, device: torch.device) -> Dict[str, Any]:
        """Score the generated images `{index:05d}.png` in `folder`."""


class FidInceptionScore:
    """FID against reference statistics and the Inception Score, on stock torch-fidelity (`util.metrics`)."""

    name = "fid_is"

    def __init__(self, stats_path: str | None, weights_path: str | None, img_size: int):
        self.stats_path = stats_path or default_fid_stats_path(img_size)
        self.weights_path = weights_path
        self.img_size = img_size

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FidInceptionScore:
        return cls(args.fid_stats, args.inception_weights, args.img_size)

    def check(self) -> None:
        if self.stats_path is None:
            raise MissingMetricFile("FID reference statistics", f"<none for --img_size {self.img_size}>",
                                    "pass --fid_stats (tools/make_fid_stats.py builds one from an image folder)")
        load_reference_statistics(self.stats_path)
        self.weights_path = resolve_inception_weights(self.weights_path)
        load_inception("cpu", self.weights_path)  # a wrong file fails now, not after hours of generation

    def compute(self, folder: str, device: torch.device) -> Dict[str, Any]:
        return compute_fid_is(folder, self.stats_path, device, weights_path=self.weights_path)


def _digits_judge(args: argparse.Namespace) -> EvalMetric:
    from digits.metric import DigitsJudge  # the digits wing is only imported when asked for

    return DigitsJudge.from_args(args)


EVAL_METRICS: Dict[str, Callable[[argparse.Namespace], EvalMetric]] = {
    "fid_is": FidInceptionScore.from_args,
    "digits": _digits_judge,  # class-consistency, Frechet distance and spread under a digits classifier
}
DEFAULT_METRICS = ("fid_is",)
