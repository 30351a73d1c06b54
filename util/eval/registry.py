"""The metrics an evaluation runs over its folder of generated images: one interface, one registry.

A metric is built from the run's `MetricSettings` (`EVAL_METRICS[name](settings)`), checks the files it needs before any
image is generated (`check`, which raises `MissingMetricFile` naming an absent file), and scores a finished
folder (`compute(folder, device) -> {key: value}`); its keys go into the evaluation record (`metrics.json`),
and its float values to tensorboard. After `check`, `sources()` names what the scores depend on besides the
images (reference files with their sha256, the torch-fidelity version), so that two records can be compared by
reading them. `--metrics` takes names of this registry.

The metrics that read Inception features of the generated folder (`fid_is`, `kid`) share one Inception pass
over it (`InceptionPass`). Precision/recall (`prc`) is a metric of its own because torch-fidelity computes it
on another network, VGG16, whose 528 MB weights file (`--prc_weights`) only that metric needs.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Dict, NamedTuple, Optional, Protocol, Sequence

import torch
import torch_fidelity
from torch_fidelity.utils import glob_samples_paths

from util import distributed as dist
from util.eval.fidelity import (
    FEATURE_KID,
    FEATURE_PRC,
    IMAGE_EXTENSIONS,
    INCEPTION_FEATURES,
    MissingMetricFile,
    default_fid_stats_path,
    features_from_batches,
    image_batches,
    image_folder_dataset,
    inception_features,
    kernel_inception_distance,
    load_inception,
    load_reference_statistics,
    load_vgg16,
    merge_feature_parts,
    metrics_from_features,
    precision_recall,
    reference_images,
    resolve_inception_weights,
    resolve_vgg16_weights,
)
from util.io import file_source


class MetricSettings(NamedTuple):
    """What the metrics of an evaluation read: their files (None: the default place) and the generation's size."""

    img_size: int                         # --img_size: a folder of real images is centre-cropped to it
    num_images: int                       # --num_images
    class_num: int                        # --class_num (class-major order, `util.eval.layout`)
    fid_stats: Optional[str] = None       # --fid_stats: reference mu/sigma (default: the img_size's ImageNet file)
    inception_weights: Optional[str] = None  # --inception_weights (default: torch-hub's cache)
    ref_images: Optional[str] = None      # --ref_images: real images for kid, prc and digits
    prc_weights: Optional[str] = None     # --prc_weights: VGG16 for prc (default: torch-hub's cache)
    digits_judge: Optional[str] = None    # --digits_judge: the digits classifier file


class EvalMetric(Protocol):
    name: str

    def check(self) -> None:
        """Load and validate every file the metric reads; raise MissingMetricFile (or ValueError) if unusable."""

    def compute(self, folder: str, device: torch.device) -> Dict[str, Any]:
        """Score the generated images `{index:05d}.png` in `folder`."""

    def sources(self) -> Dict[str, str]:
        """What the scores depend on besides the images: files (with sha256) and library versions."""


def fidelity_sources(weights_key: str, weights_path: str, ref_key: str, ref_path: str | None) -> Dict[str, str]:
    """The sources of a torch-fidelity metric: its network's weights, its reference and the library version."""
    return {**file_source(ref_key, ref_path), **file_source(weights_key, weights_path),
            "torch_fidelity_version": torch_fidelity.__version__}


def _folder_fingerprint(folder: str) -> tuple:
    """(path, size, mtime) of each image directly in `folder`: features of an unchanged folder can be reused."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = glob_samples_paths(folder, False, IMAGE_EXTENSIONS, verbose=False)
    return tuple((path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files)


class InceptionPass:
    """One Inception pass over a generated folder, shared by every metric that reads its features.

    A metric `register`s the feature names it reads once its `check` has passed. The first `features` call for
    a folder extracts the union of the names registered for the same weights file; later calls for the folder
    (its images unchanged) are served from memory. Only one folder is kept, and only until every registered
    metric still alive has read it ([50000, 3056] float32, 0.6 GB, for FID/IS/KID of 50k images).
    """

    def __init__(self):
        self._wanted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # metric -> (weights, names)
        self._key: tuple | None = None  # (folder, weights path, folder fingerprint)
        self._features: Dict[str, torch.Tensor] = {}
        self._unread: weakref.WeakSet = weakref.WeakSet()

    def register(self, metric: object, weights_path: str, names: Sequence[str]) -> None:
        self._wanted[metric] = (weights_path, tuple(names))

    def features(self, metric: object, folder: str, device: torch.device) -> Dict[str, torch.Tensor]:
        """Features `{name: [N, dim]}` (float32, CPU) of `folder` that `metric` registered."""
        weights_path, names = self._wanted[metric]
        key = (os.path.realpath(folder), weights_path, _folder_fingerprint(folder))
        if key != self._key or not set(names) <= self._features.keys():
            sharing = [other for other, (weights, _) in self._wanted.items() if weights == weights_path]
            union = sorted({name for other in sharing for name in self._wanted[other][1]})
            self.clear()
            self._features = inception_features(folder, device, weights_path=weights_path, features=union)
            self._key, self._unread = key, weakref.WeakSet(sharing)
        wanted = {name: self._features[name] for name in names}
        self._unread.discard(metric)
        if not self._unread:
            self.clear()
        return wanted

    def clear(self) -> None:
        self._key, self._features, self._unread = None, {}, weakref.WeakSet()

    def extract(self, folder: str, device: torch.device) -> None:
        """Every rank's share of `folder`'s Inception features, gathered for rank 0's metrics (a collective: all
        ranks call it once the folder is complete). Each rank runs the batches `b % world == rank` of one pass
        (`inception_features`' `part`), so rank 0's features, and its FID/IS, equal those of one pass alone.

        Nothing happens without a group, without a registered metric, or when the ranks' metrics or weights
        files differ (a file missing on some node): rank 0's metrics then read the folder alone, as before.
        """
        world = dist.get_world_size()
        if world == 1:
            return
        wanted: Dict[str, set] = {}
        for weights, names in self._wanted.values():
            wanted.setdefault(weights, set()).update(names)
        plan = sorted((weights, tuple(sorted(names))) for weights, names in wanted.items())
        plans = dist.all_gather_object(plan)  # on every rank, before any rank decides
        if len(plan) != 1 or any(other != plan for other in plans):
            return
        weights_path, names = plan[0]
        part = inception_features(folder, device, weights_path=weights_path, features=names,
                                  part=(dist.get_rank(), world))
        parts = dist.gather_object(part)
        if parts is None:
            return
        self.clear()
        self._features = merge_feature_parts(parts)
        self._key = (os.path.realpath(folder), weights_path, _folder_fingerprint(folder))
        self._unread = weakref.WeakSet(metric for metric, (weights, _) in self._wanted.items()
                                       if weights == weights_path)


SHARED_INCEPTION = InceptionPass()  # the pass of every metric built from EVAL_METRICS


class FidInceptionScore:
    """FID against reference statistics and the Inception Score, on stock torch-fidelity (`util.eval.fidelity`)."""

    name = "fid_is"

    def __init__(self, stats_path: str | None, weights_path: str | None, img_size: int,
                 inception: InceptionPass = SHARED_INCEPTION):
        self.stats_path = stats_path or default_fid_stats_path(img_size)
        self.weights_path = weights_path
        self.img_size = img_size
        self.inception = inception
        self._reference = None  # {"mu", "sigma"}, read by check
        self._sources: Dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: MetricSettings) -> FidInceptionScore:
        return cls(settings.fid_stats, settings.inception_weights, settings.img_size)

    def check(self) -> None:
        if self.stats_path is None:
            raise MissingMetricFile("FID reference statistics", f"<none for --img_size {self.img_size}>",
                                    "pass --fid_stats (tools/make_fid_stats.py builds one from an image folder)")
        self._reference = load_reference_statistics(self.stats_path)
        self.weights_path = resolve_inception_weights(self.weights_path)
        load_inception("cpu", self.weights_path)  # a wrong file fails now, not after hours of generation
        self.inception.register(self, self.weights_path, INCEPTION_FEATURES)
        self._sources = fidelity_sources("inception_weights", self.weights_path, "fid_stats", self.stats_path)

    def sources(self) -> Dict[str, str]:
        return self._sources

    def compute(self, folder: str, device: torch.device) -> Dict[str, Any]:
        """`fid`, `inception_score`, `inception_score_std` and `num_images`, as `util.eval.fidelity.compute_fid_is`."""
        if self._reference is None:
            self.check()
        return metrics_from_features(self.inception.features(self, folder, device), self._reference)


class KernelInceptionDistance:
    """KID against the real images `--ref_images`, on the Inception `2048` features FID uses (one shared pass).

    Args:
        ref_images: a folder of real images (searched recursively) or an ADM reference batch `.npz` (`arr_0`).
        weights_path: Inception weights file (`--inception_weights`); None uses torch-hub's cache.
        img_size: a folder's images are center-cropped to this size (ADM's crop; `--img_size`).
    """

    name = "kid"

    def __init__(self, ref_images: str | None, weights_path: str | None, img_size: int,
                 inception: InceptionPass = SHARED_INCEPTION):
        self.ref_images = ref_images
        self.weights_path = weights_path
        self.img_size = img_size
        self.inception = inception
        self._checked = False
        self._sources: Dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: MetricSettings) -> KernelInceptionDistance:
        return cls(settings.ref_images, settings.inception_weights, settings.img_size)

    def check(self) -> None:
        reference_images(self.ref_images, resize=self.img_size)
        self.weights_path = resolve_inception_weights(self.weights_path)
        load_inception("cpu", self.weights_path, (FEATURE_KID,))
        self.inception.register(self, self.weights_path, (FEATURE_KID,))
        self._sources = fidelity_sources("inception_weights", self.weights_path, "ref_images", self.ref_images)
        self._checked = True

    def sources(self) -> Dict[str, str]:
        return self._sources

    def compute(self, folder: str, device: torch.device) -> Dict[str, Any]:
        """`kid`, `kid_std` (over torch-fidelity's 100 subsets) and `kid_subset_size` (min(1000, N, M))."""
        if not self._checked:
            self.check()
        generated = self.inception.features(self, folder, device)[FEATURE_KID]  # [N, 2048]
        batches, count = reference_images(self.ref_images, device, resize=self.img_size)
        extractor = load_inception(device, self.weights_path, (FEATURE_KID,))
        reference = features_from_batches(extractor, batches, total=count)[FEATURE_KID]  # [M, 2048]
        return kernel_inception_distance(generated, reference)


class PrecisionRecall:
    """Improved precision and recall against `--ref_images`, on torch-fidelity's default network for them: VGG16.

    Keys are `prc_precision`/`prc_recall`: the evaluation record's `precision` is the autocast precision.

    Args:
        ref_images: a folder of real images (searched recursively) or an ADM reference batch `.npz` (`arr_0`).
        weights_path: torchvision's VGG16 weights file (`--prc_weights`); None uses torch-hub's cache.
        img_size: a folder's images are center-cropped to this size (ADM's crop; `--img_size`).
    """

    name = "prc"

    def __init__(self, ref_images: str | None, weights_path: str | None, img_size: int):
        self.ref_images = ref_images
        self.weights_path = weights_path
        self.img_size = img_size
        self._checked = False
        self._sources: Dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: MetricSettings) -> PrecisionRecall:
        return cls(settings.ref_images, settings.prc_weights, settings.img_size)

    def check(self) -> None:
        reference_images(self.ref_images, resize=self.img_size)
        self.weights_path = resolve_vgg16_weights(self.weights_path)
        load_vgg16("cpu", self.weights_path)
        self._sources = fidelity_sources("prc_weights", self.weights_path, "ref_images", self.ref_images)
        self._checked = True

    def sources(self) -> Dict[str, str]:
        return self._sources

    def compute(self, folder: str, device: torch.device) -> Dict[str, Any]:
        """`prc_precision` and `prc_recall` (torch-fidelity's 3-nearest-neighbour balls on VGG16 `fc2_relu`)."""
        if not self._checked:
            self.check()
        extractor = load_vgg16(device, self.weights_path)
        dataset = image_folder_dataset(folder)
        generated = features_from_batches(extractor, image_batches(dataset, device), total=len(dataset))
        batches, count = reference_images(self.ref_images, device, resize=self.img_size)
        reference = features_from_batches(extractor, batches, total=count)
        # Pairwise distances on the device: [N, M] blocks are the cost at 50k images.
        precision, recall = precision_recall(generated[FEATURE_PRC].to(device), reference[FEATURE_PRC].to(device))
        return {"prc_precision": precision, "prc_recall": recall}


def _digits_judge(settings: MetricSettings) -> EvalMetric:
    from digits.metric import DigitsJudge  # the digits wing is only imported when asked for

    return DigitsJudge(settings.digits_judge, settings.ref_images, settings.num_images, settings.class_num)


EVAL_METRICS: Dict[str, Callable[[MetricSettings], EvalMetric]] = {
    "fid_is": FidInceptionScore.from_settings,
    "kid": KernelInceptionDistance.from_settings,  # needs --ref_images; shares fid_is's Inception pass
    "prc": PrecisionRecall.from_settings,  # needs --ref_images and VGG16 weights (--prc_weights)
    "digits": _digits_judge,  # class-consistency, Frechet distance and spread under a digits classifier
}
DEFAULT_METRICS = ("fid_is",)
