"""FID and Inception Score exactly as the original's evaluation computes them, on stock torch-fidelity.

The original (MAR / TransDiff) scores a folder of generated PNGs with the LTH14 fork of torch-fidelity::

    calculate_metrics(input1=folder, input2=None, fid_statistics_file=stats_npz, cuda=True,
                      isc=True, fid=True, kid=False, prc=False, verbose=False)

PyPI torch-fidelity 0.4 has no ``fid_statistics_file``. This module reproduces that call with 0.4's own
building blocks, so the arithmetic is the fork's:

* one pass of the ``inception-v3-compat`` extractor over the folder's images (sorted paths, PIL -> RGB
  uint8, TF1-compatible resize to 299), producing ``logits_unbiased`` and ``2048`` (pool) features;
* Inception Score from ``logits_unbiased``: 10 splits of a permutation drawn with
  ``np.random.RandomState(2020)`` (torch-fidelity's ``isc_features_to_metric``);
* FID between ``fid_features_to_statistics`` of the ``2048`` features (float32 ``mu``, float64
  ``sigma``) and the ``mu``/``sigma`` stored in the reference ``.npz``
  (torch-fidelity's ``fid_statistics_to_metric``).

Nothing is ever downloaded. The Inception weights come from an explicit path or torch-hub's cache (see
``resolve_inception_weights``); a missing weights or reference-statistics file raises
``MissingMetricFile`` naming the file and where to get it, before any image is read.

Callers that generate images in shards can run ``load_inception`` + ``features_from_batches`` on each
rank, gather the feature dicts and call ``metrics_from_features`` once.

KID and precision/recall against a set of real images (``reference_images``: a folder, or an ADM reference
batch ``.npz`` read in chunks by ``NpzImages``) use torch-fidelity 0.4's own defaults and arithmetic:

* KID (``kernel_inception_distance``): the same Inception ``2048`` features as FID, ``kid_features_to_metric``
  with 100 subsets, a cubic polynomial kernel and seed 2020; the subset size is ``min(1000, N, M)``.
* Precision and recall (``precision_recall``, Kynkaanniemi et al. 2019): torch-fidelity computes them on
  another network, torchvision's ImageNet VGG16 (``fc2_relu``, 4096 features, images resized to 224), with
  3-nearest-neighbour balls (``prc_features_to_metric``). Its weights file (``resolve_vgg16_weights``) is,
  like Inception's, never downloaded here.
"""
import io
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch_fidelity.datasets import ImagesPathDataset, TransformPILtoRGBTensor
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor, glob_samples_paths
from torchvision.models import VGG16_Weights
from torchvision.transforms import Compose
from tqdm import tqdm

from util.checkpoint import check_finite
from util.data.crops import CenterCropArr
from util.io import atomic_write

PathLike = str | os.PathLike
DeviceLike = str | torch.device

REPO_ROOT = Path(__file__).resolve().parents[2]  # util/eval/fidelity.py -> the repository

INCEPTION_EXTRACTOR = "inception-v3-compat"
FEATURE_ISC = "logits_unbiased"  # torch-fidelity's default layer for the Inception Score
FEATURE_FID = "2048"  # pool features, torch-fidelity's default layer for FID
INCEPTION_FEATURES = (FEATURE_ISC, FEATURE_FID)
ISC_SPLITS = DEFAULTS["isc_splits"]  # 10
ISC_RNG_SEED = DEFAULTS["rng_seed"]  # 2020, the split permutation seed
BATCH_SIZE = DEFAULTS["batch_size"]  # 64, what the original's call used
IMAGE_EXTENSIONS = DEFAULTS["samples_find_ext"]  # "png,jpg,jpeg"

FEATURE_KID = "2048"  # torch-fidelity's default KID layer of the Inception network: FID's pool features
KID_SUBSETS = DEFAULTS["kid_subsets"]  # 100
KID_SUBSET_SIZE = DEFAULTS["kid_subset_size"]  # 1000, capped at the number of images
PRC_EXTRACTOR = "vgg16"  # torch-fidelity's default precision/recall network (DEFAULT_FEATURE_EXTRACTOR["prc"])
FEATURE_PRC = "fc2_relu"  # its default precision/recall layer: [N, 4096]
PRC_NEIGHBORHOOD = DEFAULTS["prc_neighborhood"]  # 3: the k of the k-nearest-neighbour balls
PRC_BATCH_SIZE = DEFAULTS["prc_batch_size"]  # 10000 rows per block of pairwise distances
VGG16_WEIGHTS_URL = VGG16_Weights.IMAGENET1K_V1.url  # torchvision's weights, what torch-fidelity downloads
ADM_IMAGES_ARRAY = "arr_0"  # the images of an ADM reference/sample batch .npz: uint8 [N, H, W, 3]

ADM_REF_256_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                   "VIRTUAL_imagenet256_labeled.npz")
TRANSDIFF_REF_512_URL = "https://huggingface.co/zhendch/Transdiff/resolve/main/VIRTUAL_imagenet512.npz"

# img_size -> reference statistics file the original evaluation reads (relative to the repo root).
DEFAULT_FID_STATS = {
    256: "fid_stats/adm_in256_stats.npz",
    512: "fid_stats/VIRTUAL_imagenet512.npz",
}

_STATS_SOURCES = {
    "adm_in256_stats.npz": (
        "It is the mu/sigma of ADM's ImageNet 256x256 reference batch: copy fid_stats/adm_in256_stats.npz from "
        "MAR's repository (https://github.com/LTH14/mar), or download ADM's VIRTUAL_imagenet256_labeled.npz "
        f"({ADM_REF_256_URL}), which holds the same mu and sigma, and save it under this name."),
    "VIRTUAL_imagenet512.npz": (
        f"It is ADM's ImageNet 512x512 reference batch, re-hosted by TransDiff: download {TRANSDIFF_REF_512_URL} "
        "(857 MB) to this path."),
}


class MissingMetricFile(FileNotFoundError):
    """A file a metric needs is absent; the message names it and says how to obtain it.

    Attributes:
        path: the missing file.
    """

    def __init__(self, what: str, path: PathLike, how_to_get: str):
        super().__init__(f"{what} not found: {path}\n{how_to_get}")
        self.path = str(path)


def hub_inception_weights_path() -> str:
    """Where torch-fidelity caches the Inception weights: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def _missing_weights(path: PathLike) -> MissingMetricFile:
    """Build the error for an absent Inception weights file."""
    return MissingMetricFile(
        "Inception weights file", path,
        f"FID/IS use torch-fidelity's '{INCEPTION_EXTRACTOR}' network; nothing is downloaded automatically. "
        f"Download {URL_INCEPTION_V3} (or run torch-fidelity once on a machine with internet, which caches it) "
        f"and either place it at {hub_inception_weights_path()} (torch.hub.get_dir()/checkpoints, i.e. "
        "$TORCH_HOME/hub/checkpoints) or pass its path explicitly (weights_path= / --inception_weights).")


def _missing_stats(path: PathLike) -> MissingMetricFile:
    """Build the error for an absent reference-statistics file, with the known source of ImageNet ones."""
    source = _STATS_SOURCES.get(
        Path(path).name,
        "Compute reference statistics for your dataset with "
        f"`python tools/make_fid_stats.py --image_dir <images> --out {path}`.")
    return MissingMetricFile("FID reference statistics file", path, source)


def resolve_inception_weights(path: PathLike | None = None) -> str:
    """Return the Inception weights file to use, never downloading.

    Args:
        path: explicit weights file; it must exist. None looks for torch-fidelity's cached download
            ``hub_inception_weights_path()``.

    Raises:
        MissingMetricFile: the file is absent. Users with internet can download the weights from the URL in
            the message, or run torch-fidelity once (it caches them in the same place).
    """
    candidate = hub_inception_weights_path() if path is None else os.fspath(path)
    if not os.path.isfile(candidate):
        raise _missing_weights(candidate)
    return candidate


def hub_vgg16_weights_path() -> str:
    """Where torchvision (hence torch-fidelity) caches VGG16: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(VGG16_WEIGHTS_URL))


def resolve_vgg16_weights(path: PathLike | None = None) -> str:
    """Return the VGG16 weights file of precision/recall, never downloading.

    Args:
        path: explicit weights file (torchvision's ``vgg16-397923af.pth``); it must exist. None looks for
            torchvision's cached download ``hub_vgg16_weights_path()``.

    Raises:
        MissingMetricFile: the file is absent; the message says where to get it.
    """
    candidate = hub_vgg16_weights_path() if path is None else os.fspath(path)
    if not os.path.isfile(candidate):
        raise MissingMetricFile(
            "VGG16 weights file", candidate,
            f"Precision/recall use torch-fidelity's '{PRC_EXTRACTOR}' network (torchvision's ImageNet VGG16, "
            f"528 MB); nothing is downloaded automatically. Download {VGG16_WEIGHTS_URL} (or run "
            "torchvision.models.vgg16(weights='IMAGENET1K_V1') once on a machine with internet, which caches it) "
            f"and either place it at {hub_vgg16_weights_path()} or pass its path explicitly "
            "(weights_path= / --prc_weights).")
    return candidate


def default_fid_stats_path(img_size: int) -> str | None:
    """Reference statistics the original uses for ``img_size`` (absolute path under the repo), or None."""
    relative = DEFAULT_FID_STATS.get(img_size)
    return None if relative is None else str(REPO_ROOT / relative)


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
    """Raise ValueError unless ``mu`` is ``[d]`` and ``sigma`` is ``[d, d]``."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{source}: expected mu [d] and sigma [d, d], got mu {tuple(mu.shape)} "
                         f"and sigma {tuple(sigma.shape)}")


def load_reference_statistics(path: PathLike) -> dict[str, np.ndarray]:
    """Read ``mu`` and ``sigma`` from a reference ``.npz`` (ADM reference batch, MAR stats or ours).

    Dtypes are kept as stored (ADM and torch-fidelity: float32 ``mu``, float64 ``sigma``).

    Raises:
        MissingMetricFile: the file does not exist.
        ValueError: the file lacks ``mu``/``sigma`` or their shapes disagree.
    """
    if not os.path.isfile(path):
        raise _missing_stats(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise ValueError(f"{path} has no {missing} array(s) (found {data.files}); reference statistics "
                                 "need 'mu' and 'sigma'. An ADM *sample* batch (arr_0 only) is not a reference: "
                                 "compute statistics with tools/make_fid_stats.py")
            stats = {"mu": data["mu"], "sigma": data["sigma"]}
    except Exception as error:  # zip, header and pickle failures of foreign bytes
        if isinstance(error, ValueError) and str(path) in str(error):
            raise
        raise ValueError(f"{path} is not a readable .npz of reference statistics (mu, sigma): it is corrupt or "
                         "holds pickled objects, which are never loaded") from error
    _check_statistics(stats["mu"], stats["sigma"], str(path))
    if not (np.isfinite(stats["mu"]).all() and np.isfinite(stats["sigma"]).all()):
        raise ValueError(f"{path}: mu or sigma holds non-finite values")
    return stats


def save_reference_statistics(path: PathLike, mu, sigma) -> None:
    """Atomically write ``mu`` (as float32) and ``sigma`` (as float64) to ``path``, the ADM/torch-fidelity dtypes.

    The file is written exactly at ``path`` (no ``.npz`` suffix is appended); parent folders are created.
    """
    mu = np.asarray(mu, dtype=np.float32)
    sigma = np.asarray(sigma, dtype=np.float64)
    _check_statistics(mu, sigma, "save_reference_statistics")
    atomic_write(str(path), lambda handle: np.savez(handle, mu=mu, sigma=sigma))


def _as_float_array(x) -> np.ndarray:
    """``x`` (array or CPU tensor) as a floating numpy array, integers promoted to float64."""
    array = np.asarray(x)
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between Gaussians ``(mu1, sigma1)`` and ``(mu2, sigma2)``, computed by torch-fidelity.

    ``trace(sqrtm(sigma1 @ sigma2))`` is torch-fidelity's sum of square roots of the eigenvalues (as in the
    fork). When both statistics share dtypes (e.g. float32 ``mu``, float64 ``sigma`` on both sides, as for
    the ADM reference files) the numbers are bit-identical to the fork's; otherwise both sides are promoted
    to the common dtype, where torch-fidelity would refuse mismatched dtypes.

    Raises:
        ValueError: ``mu``s are not ``[d]`` or ``sigma``s are not ``[d, d]`` of one common ``d``.
    """
    mu1, sigma1, mu2, sigma2 = (_as_float_array(x) for x in (mu1, sigma1, mu2, sigma2))
    _check_statistics(mu1, sigma1, "first statistics")
    _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}")
    mu_dtype = np.promote_types(mu1.dtype, mu2.dtype)
    sigma_dtype = np.promote_types(sigma1.dtype, sigma2.dtype)
    first = {"mu": mu1.astype(mu_dtype, copy=False), "sigma": sigma1.astype(sigma_dtype, copy=False)}
    second = {"mu": mu2.astype(mu_dtype, copy=False), "sigma": sigma2.astype(sigma_dtype, copy=False)}
    return fid_statistics_to_metric(first, second, False)[KEY_METRIC_FID]


def statistics_from_features(features) -> dict[str, np.ndarray]:
    """FID statistics of ``[N, d]`` features with torch-fidelity's code: float32 ``mu``, float64 ``sigma``."""
    features = torch.as_tensor(features, dtype=torch.float32).cpu()
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N, d] with N >= 2 for a covariance, got {tuple(features.shape)}")
    return fid_features_to_statistics(features)


def inception_score(logits, splits: int = ISC_SPLITS, rng_seed: int = ISC_RNG_SEED) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of ``[N, classes]`` logits with torch-fidelity's code.

    The rows are permuted with ``np.random.RandomState(rng_seed)`` and cut into ``splits`` parts, as
    torch-fidelity does by default. With fewer than ``splits`` images, ``N`` splits are used (torch-fidelity
    would return NaN).
    """
    logits = torch.as_tensor(logits).cpu()
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"need logits [N, classes] with N >= 1, got {tuple(logits.shape)}")
    score = isc_features_to_metric(logits, splits=min(splits, logits.shape[0]), shuffle=True, rng_seed=rng_seed)
    return score[KEY_METRIC_ISC_MEAN], score[KEY_METRIC_ISC_STD]


def metrics_from_features(features: dict[str, torch.Tensor], reference: dict[str, np.ndarray],
                          isc_splits: int = ISC_SPLITS) -> dict[str, float]:
    """FID against ``reference`` (``mu``, ``sigma``) and IS, from features of ``INCEPTION_FEATURES``.

    Returns:
        ``fid``, ``inception_score``, ``inception_score_std`` and ``num_images``.
    """
    missing = [name for name in INCEPTION_FEATURES if name not in features]
    if missing:
        raise ValueError(f"features lack {missing}; extract them with load_inception(features={INCEPTION_FEATURES})")
    stats = statistics_from_features(features[FEATURE_FID])
    is_mean, is_std = inception_score(features[FEATURE_ISC], splits=isc_splits)
    return {
        "fid": frechet_distance(stats["mu"], stats["sigma"], reference["mu"], reference["sigma"]),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "num_images": int(features[FEATURE_FID].shape[0]),
    }


def _load_extractor(name: str, features: Sequence[str], path: str, device: DeviceLike) -> FeatureExtractorBase:
    """torch-fidelity's extractor ``name`` with the weights file ``path``, on ``device``.

    torch-fidelity unpickles weights with weights_only=False; they are loaded safely here and handed over as an
    in-memory copy holding only tensors.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        check_finite(state_dict, str(path))
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        extractor = create_feature_extractor(name, list(features), cuda=False,
                                             feature_extractor_weights_path=buffer, verbose=False)
    except Exception as error:  # foreign bytes, pickled objects or another network's state dict
        detail = "" if isinstance(error, pickle.UnpicklingError) else f": {str(error).splitlines()[0][:200]}"
        raise ValueError(f"{path} is not a weights file of torch-fidelity's {name} network "
                         f"({type(error).__name__}{detail})") from None
    return extractor.to(torch.device(device))


def load_inception(device: DeviceLike, weights_path: PathLike | None = None,
                   features: Sequence[str] = INCEPTION_FEATURES) -> FeatureExtractorInceptionV3:
    """torch-fidelity's ``inception-v3-compat`` extractor on ``device``, returning ``features`` per batch.

    Args:
        device: where the network runs (any torch device; torch-fidelity itself only knows ``cuda=True``).
        weights_path: Inception weights file; None uses torch-hub's cache (see ``resolve_inception_weights``).
        features: feature names, e.g. ``FEATURE_ISC`` ([N, 1008] logits) and ``FEATURE_FID`` ([N, 2048]).
    """
    return _load_extractor(INCEPTION_EXTRACTOR, features, resolve_inception_weights(weights_path), device)


def load_vgg16(device: DeviceLike, weights_path: PathLike | None = None,
               features: Sequence[str] = (FEATURE_PRC,)) -> FeatureExtractorBase:
    """torch-fidelity's ``vgg16`` extractor (precision/recall) on ``device``; ``FEATURE_PRC`` is [N, 4096].

    Args:
        weights_path: torchvision's VGG16 weights file; None uses torch-hub's cache (``resolve_vgg16_weights``).
    """
    return _load_extractor(PRC_EXTRACTOR, features, resolve_vgg16_weights(weights_path), device)


@torch.no_grad()
def features_from_batches(extractor: FeatureExtractorBase, batches: Iterable[torch.Tensor],
                          total: int | None = None, verbose: bool = False) -> dict[str, torch.Tensor]:
    """Run a torch-fidelity ``extractor`` over uint8 image batches ``[B, 3, H, W]`` (any H, W; resized inside).

    Args:
        total: number of images, only for the progress bar.
        verbose: show a tqdm progress bar.

    Returns:
        float32 CPU features ``{name: [N, dim]}`` for each requested feature name.
    """
    device = next(extractor.parameters()).device
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in extractor.get_requested_features_list()}
    with tqdm(total=total, disable=not verbose, unit="img", desc=f"{extractor.name} features") as progress:
        for batch in batches:
            output = extractor.convert_features_tuple_to_dict(extractor(batch.to(device, non_blocking=True)))
            for name, value in output.items():
                collected[name].append(value.cpu())  # [B, dim]
            progress.update(batch.shape[0])
    if not collected[next(iter(collected))]:
        raise ValueError(f"no images were given to the {extractor.name} network")
    return {name: torch.cat(chunks) for name, chunks in collected.items()}  # [N, dim]


def image_folder_dataset(image_dir: PathLike, recursive: bool = False,
                         resize: int | None = None) -> ImagesPathDataset:
    """torch-fidelity's dataset over the png/jpg/jpeg files of ``image_dir`` (sorted real paths, uint8 RGB).

    Args:
        recursive: also search sub-folders (torch-fidelity's ``samples_find_deep``), e.g. an ImageFolder root.
        resize: if set, center-crop each image to ``resize x resize`` first (ADM's ``center_crop_arr``, as for
            ImageNet), so folders of mixed sizes can be batched (torch-fidelity needs one size per batch).
            None keeps the images as they are.
    """
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    files = glob_samples_paths(os.fspath(image_dir), recursive, IMAGE_EXTENSIONS, verbose=False)
    if not files:
        raise ValueError(f"no {IMAGE_EXTENSIONS} images in {image_dir} (recursive={recursive})")
    if resize is None:
        return ImagesPathDataset(files)
    if resize < 1:
        raise ValueError(f"resize must be a positive size in pixels, got {resize}")
    return ImagesPathDataset(files, Compose([CenterCropArr(resize), TransformPILtoRGBTensor()]))


def _stack_same_size(images: list[torch.Tensor]) -> torch.Tensor:
    """Collate ``[3, H, W]`` uint8 images into ``[B, 3, H, W]``, explaining a size mismatch."""
    sizes = sorted({tuple(image.shape[1:]) for image in images})
    if len(sizes) > 1:
        raise ValueError(f"images of one folder must share one size to be batched, found (H, W) {sizes}; "
                         "pass resize= (tools/make_fid_stats.py --resize) to center-crop them to one size")
    return torch.stack(images)


def image_batches(dataset: ImagesPathDataset, device: DeviceLike, batch_size: int = BATCH_SIZE,
                  num_workers: int | None = None) -> DataLoader:
    """uint8 batches ``[B, 3, H, W]`` of ``dataset`` in its order (DataLoader, pinned memory for CUDA).

    Args:
        num_workers: workers decoding images; None = torch-fidelity's ``min(4, 2 * cpu_count)``.
    """
    if num_workers is None:
        num_workers = min(4, 2 * (os.cpu_count() or 1))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                      collate_fn=_stack_same_size, pin_memory=torch.device(device).type == "cuda")


def inception_features(image_dir: PathLike, device: DeviceLike, batch_size: int = BATCH_SIZE,
                       weights_path: PathLike | None = None, verbose: bool = False,
                       num_workers: int | None = None, recursive: bool = False, resize: int | None = None,
                       features: Sequence[str] = INCEPTION_FEATURES,
                       part: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """Inception features ``{name: [N, dim]}`` (float32, CPU) of the images in ``image_dir``.

    Args:
        batch_size: images per Inception forward (torch-fidelity's default 64, as the original).
        weights_path: Inception weights file; None uses torch-hub's cache.
        num_workers: DataLoader workers decoding images; None = torch-fidelity's ``min(4, 2 * cpu_count)``.
        recursive: also search sub-folders.
        resize: center-crop/resize every image to this square size first (see ``image_folder_dataset``).
        features: feature names to return.
        part: ``(k, parts)``: only the batches ``b`` with ``b % parts == k``, each the same batch of images as in
            one pass, so that `merge_feature_parts` of all the parts equals one pass bit for bit.
    """
    dataset = image_folder_dataset(image_dir, recursive, resize)
    k, parts = part
    if parts > 1:
        dataset = Subset(dataset, [i for i in range(len(dataset)) if (i // batch_size) % parts == k])
        if not len(dataset):
            return {name: torch.empty(0) for name in features}
    extractor = load_inception(device, weights_path, features)
    return features_from_batches(extractor, image_batches(dataset, device, batch_size, num_workers),
                                 total=len(dataset), verbose=verbose)


def merge_feature_parts(parts: Sequence[dict[str, torch.Tensor]], batch_size: int = BATCH_SIZE
                        ) -> dict[str, torch.Tensor]:
    """The features of one pass from those of `inception_features`' ``part=(k, len(parts))`` for every k: batch
    ``b`` of the pass is the ``b // len(parts)``-th batch of part ``b % len(parts)``."""
    sizes = [len(next(iter(part.values()))) for part in parts]
    batches = [-(-size // batch_size) for size in sizes]  # batches per part (the last may be partial)
    merged = {}
    for name in parts[0]:
        chunks = [parts[b % len(parts)][name][(b // len(parts)) * batch_size:][:batch_size]
                  for b in range(sum(batches))]
        merged[name] = torch.cat(chunks)  # [N, dim]
    return merged


def _missing_reference(path: PathLike) -> MissingMetricFile:
    return MissingMetricFile(
        "reference image set", path,
        "KID and precision/recall compare the samples with real images given by --ref_images: a folder of images "
        "(searched recursively, e.g. an ImageFolder split) or an ADM reference batch .npz with uint8 images "
        f"'{ADM_IMAGES_ARRAY}' [N, H, W, 3], e.g. VIRTUAL_imagenet256_labeled.npz ({ADM_REF_256_URL}).")


def _bad_npz_images(path: PathLike, why: str) -> ValueError:
    return ValueError(f"{path} is not an ADM-style image batch: {why}. Expected a .npz whose "
                      f"'{ADM_IMAGES_ARRAY}' holds uint8 images [N, H, W, 3], such as VIRTUAL_imagenet256_labeled.npz")


def _read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the header of an ``.npy`` stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f".npy format version {version} is not supported")


class NpzImages:
    """The images ``arr_0`` (uint8 ``[N, H, W, 3]``) of an ADM-style ``.npz``, as uint8 batches ``[B, 3, H, W]``.

    Batches are read straight from the archive member, ``batch_size`` images at a time, so the whole array
    (10000 x 256 x 256 x 3 = 2 GB for ADM's VIRTUAL_imagenet256_labeled.npz) is never in memory; stored
    (``np.savez``) and compressed (``np.savez_compressed``) archives both work. Other arrays of the file
    (labels, statistics) are ignored. Only the array header is read on construction, and validated.

    Attributes:
        num_images: N.
        image_size: (H, W).

    Raises:
        MissingMetricFile: ``path`` does not exist.
        ValueError: not a readable .npz, no ``arr_0``, or ``arr_0`` is not uint8 ``[N, H, W, 3]`` (pickled
            object arrays are refused, never loaded), or it is shorter than its header says.
    """

    def __init__(self, path: PathLike, batch_size: int = BATCH_SIZE):
        if not os.path.isfile(path):
            raise _missing_reference(path)
        self.path = os.fspath(path)
        self.batch_size = batch_size
        member = ADM_IMAGES_ARRAY + ".npy"
        try:
            with zipfile.ZipFile(self.path) as archive:
                if member not in archive.namelist():
                    raise _bad_npz_images(path, f"it has no '{ADM_IMAGES_ARRAY}' array (found {archive.namelist()})")
                stored_bytes = archive.getinfo(member).file_size
                with archive.open(member) as stream:
                    shape, fortran_order, dtype = _read_npy_header(stream)
                    header_bytes = stream.tell()
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            if isinstance(error, ValueError) and self.path in str(error):
                raise
            raise _bad_npz_images(path, f"unreadable ({type(error).__name__}: {error})") from error
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] < 1 or fortran_order:
            raise _bad_npz_images(path, f"'{ADM_IMAGES_ARRAY}' is {dtype} {list(shape)}"
                                        f"{' in Fortran order' if fortran_order else ''}")
        if stored_bytes != header_bytes + int(np.prod(shape)):
            raise _bad_npz_images(path, f"'{ADM_IMAGES_ARRAY}' holds {stored_bytes - header_bytes} bytes of data, its "
                                        f"header {list(shape)} says {int(np.prod(shape))}")
        self.num_images = shape[0]
        self.image_size = (shape[1], shape[2])

    def __iter__(self) -> Iterator[torch.Tensor]:
        height, width = self.image_size
        image_bytes = height * width * 3
        with zipfile.ZipFile(self.path) as archive, archive.open(ADM_IMAGES_ARRAY + ".npy") as stream:
            _read_npy_header(stream)
            for start in range(0, self.num_images, self.batch_size):
                count = min(self.batch_size, self.num_images - start)
                chunk = stream.read(count * image_bytes)
                if len(chunk) != count * image_bytes:
                    where = start + len(chunk) // image_bytes
                    raise _bad_npz_images(self.path, f"'{ADM_IMAGES_ARRAY}' ends inside image {where}")
                images = np.frombuffer(chunk, dtype=np.uint8).reshape(count, height, width, 3)  # [B, H, W, 3]
                yield torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # [B, 3, H, W]


def reference_images(path: PathLike | None, device: DeviceLike = "cpu", resize: int | None = None,
                     batch_size: int = BATCH_SIZE,
                     num_workers: int | None = None) -> tuple[Iterable[torch.Tensor], int]:
    """uint8 batches ``[B, 3, H, W]`` of a set of real images, and how many images it holds.

    Construction validates the set (cheaply: an ``.npz`` header, a folder's first image), so it doubles as the
    check before generation.

    Args:
        path: a file, read as an ADM-style ``.npz`` by ``NpzImages`` (as stored: the networks resize inside);
            or a folder, searched recursively like an ImageFolder root (sorted paths).
        device: where the batches go (pinned memory for CUDA).
        resize: center-crop each image of a folder to ``resize x resize`` first (ADM's ``center_crop_arr``,
            a no-op on images of that size); None keeps the images, which must then share one size.
        num_workers: DataLoader workers decoding a folder's images (see ``image_batches``).

    Raises:
        MissingMetricFile: ``path`` is None or does not exist.
        ValueError: an unusable ``.npz`` or image, or a folder without images; the message names it.
    """
    if path is None:
        raise _missing_reference("<none: pass --ref_images>")
    if os.path.isfile(path):
        images = NpzImages(path, batch_size)
        return images, images.num_images
    if not os.path.isdir(path):
        raise _missing_reference(path)
    dataset = image_folder_dataset(path, recursive=True, resize=resize)
    try:
        dataset[0]
    except OSError as error:  # PIL's UnidentifiedImageError and truncated files
        raise ValueError(f"cannot read reference image {dataset.files[0]}: {error}") from error
    return image_batches(dataset, device, batch_size, num_workers), len(dataset)


def kernel_inception_distance(generated, reference, subset_size: int = KID_SUBSET_SIZE,
                              subsets: int = KID_SUBSETS, rng_seed: int = ISC_RNG_SEED) -> dict[str, float | int]:
    """KID between ``[N, d]`` and ``[M, d]`` Inception features, with torch-fidelity's code and defaults.

    The unbiased MMD^2 under the kernel ``(x . y / d + 1)^3`` is averaged over ``subsets`` pairs of random
    subsets (``np.random.RandomState(rng_seed)``). The subset size is capped at ``min(N, M)``, where
    torch-fidelity would refuse.

    Returns:
        ``kid`` (mean), ``kid_std`` (over subsets) and ``kid_subset_size``.
    """
    generated = torch.as_tensor(generated, dtype=torch.float32).cpu()
    reference = torch.as_tensor(reference, dtype=torch.float32).cpu()
    if generated.dim() != 2 or reference.dim() != 2 or generated.shape[1] != reference.shape[1]:
        raise ValueError(f"need features [N, d] and [M, d], got {tuple(generated.shape)} and {tuple(reference.shape)}")
    size = min(subset_size, generated.shape[0], reference.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {generated.shape[0]} generated and "
                         f"{reference.shape[0]} reference images")
    score = kid_features_to_metric(generated, reference, kid_subsets=subsets, kid_subset_size=size,
                                   rng_seed=rng_seed, verbose=False)
    return {"kid": score[KEY_METRIC_KID_MEAN], "kid_std": score[KEY_METRIC_KID_STD], "kid_subset_size": size}


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, neighborhood: int = PRC_NEIGHBORHOOD,
                     batch_size: int = PRC_BATCH_SIZE) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with torch-fidelity's code.

    Precision is the share of generated samples inside some reference sample's ball (radius: distance to its
    ``neighborhood``-th nearest reference neighbour); recall the reverse. Distances are computed on the
    features' device in blocks of ``batch_size`` rows (torch-fidelity's ``save_cpu_ram`` path, the same numbers
    without its full [N, N] matrices).

    Args:
        generated: ``[N, d]`` features of the samples (torch-fidelity's input1).
        reference: ``[M, d]`` features of the real images (input2), on the same device.
    """
    if generated.dim() != 2 or reference.dim() != 2 or generated.shape[1] != reference.shape[1]:
        raise ValueError(f"need features [N, d] and [M, d], got {tuple(generated.shape)} and {tuple(reference.shape)}")
    if min(generated.shape[0], reference.shape[0]) <= neighborhood:
        raise ValueError(f"precision/recall with {neighborhood} neighbours need more than {neighborhood} images on "
                         f"each side, got {generated.shape[0]} generated and {reference.shape[0]} reference images")
    score = prc_features_to_metric(generated, reference, prc_neighborhood=neighborhood, prc_batch_size=batch_size,
                                   save_cpu_ram=True, verbose=False)
    return score[KEY_METRIC_PRECISION], score[KEY_METRIC_RECALL]


def statistics_from_folder(image_dir: PathLike, device: DeviceLike, batch_size: int = BATCH_SIZE,
                           weights_path: PathLike | None = None, verbose: bool = False,
                           num_workers: int | None = None, recursive: bool = False,
                           resize: int | None = None) -> dict[str, np.ndarray]:
    """Reference statistics (float32 ``mu`` [2048], float64 ``sigma`` [2048, 2048]) of a folder of images.

    Arguments as in ``inception_features``; save the result with ``save_reference_statistics``.
    """
    features = inception_features(image_dir, device, batch_size, weights_path, verbose, num_workers, recursive,
                                  resize, features=(FEATURE_FID,))
    return statistics_from_features(features[FEATURE_FID])


def compute_fid_is(image_dir: PathLike, fid_stats_path: PathLike, device: DeviceLike,
                   batch_size: int = BATCH_SIZE, weights_path: PathLike | None = None, verbose: bool = False,
                   num_workers: int | None = None) -> dict[str, float]:
    """FID and IS of the images in ``image_dir`` (non-recursive), as the original's fork call computes them.

    Both the Inception weights and the reference statistics are checked before any image is read.

    Args:
        fid_stats_path: reference ``.npz`` with ``mu``/``sigma`` (see ``default_fid_stats_path``).
        Others as in ``inception_features``.

    Returns:
        ``fid``, ``inception_score``, ``inception_score_std`` and ``num_images``.

    Raises:
        MissingMetricFile: the weights or the statistics file is absent.
    """
    weights_path = resolve_inception_weights(weights_path)
    reference = load_reference_statistics(fid_stats_path)
    features = inception_features(image_dir, device, batch_size, weights_path, verbose, num_workers)
    return metrics_from_features(features, reference)
