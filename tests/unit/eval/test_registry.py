"""KID and precision/recall against a reference image set (util/eval/fidelity.py, util/eval/registry.py).

Values are checked against torch-fidelity's own `calculate_metrics` on the same images. The Inception weights
are the random-weight file of the `inception_weights` fixture (conftest.py). torchvision's VGG16 weights
(528 MB) cannot be downloaded here, so precision/recall run torch-fidelity's `vgg16` extractor over a toy
network of VGG16's layout (`TinyVGG`, patched in for `torchvision.models.vgg16` on both sides).
"""
import os
import zipfile

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import DEFAULT_FEATURE_EXTRACTOR

from util.eval import fidelity, registry
from util.eval.registry import (
    EVAL_METRICS,
    FidInceptionScore,
    InceptionPass,
    KernelInceptionDistance,
    MetricSettings,
    PrecisionRecall,
)

NUM_GENERATED = 4  # the 299x299 Inception forward costs ~0.25 s per image on one CPU thread
NUM_REAL = 5  # more than NUM_GENERATED: KID's subsets of the real images then differ
IMAGE_SIZE = 32


def _noise_images(seed: int, count: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Uniform-noise uint8 images ``[count, size, size, 3]``."""
    return np.random.RandomState(seed).randint(0, 256, (count, size, size, 3), dtype=np.uint8)


def _ramp_images(seed: int, count: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Horizontal colour ramps with a little noise ``[count, size, size, 3]``, far from uniform noise."""
    rng = np.random.RandomState(seed)
    ramp = np.linspace(0.0, 1.0, size)[None, None, :, None]  # [1, 1, W, 1]
    start, end = rng.uniform(0, 255, (2, count, 1, 1, 3))
    images = start + (end - start) * ramp + rng.uniform(-8, 8, (count, size, size, 3))  # [count, H, W, 3]
    return images.clip(0, 255).round().astype(np.uint8)


def _write_pngs(folder, images: np.ndarray) -> None:
    """Save uint8 ``[N, H, W, 3]`` images as ``00000.png`` ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def _concat(batches) -> torch.Tensor:
    return torch.cat(list(batches))  # [N, 3, H, W]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Generated noise and ramps, real ramps as a PNG folder and as an ADM-style .npz, and FID statistics."""
    root = tmp_path_factory.mktemp("fidelity")
    half = NUM_GENERATED // 2
    real = _ramp_images(seed=2, count=NUM_REAL)
    _write_pngs(root / "generated", np.concatenate([_noise_images(seed=1, count=half),
                                                    _ramp_images(seed=3, count=NUM_GENERATED - half)]))
    _write_pngs(root / "real", real)
    np.savez(root / "real.npz", arr_0=real, arr_1=np.arange(NUM_REAL))  # ADM's layout: images, labels
    fidelity.save_reference_statistics(root / "stats.npz", np.zeros(2048), np.eye(2048))
    return {"generated": root / "generated", "real": root / "real", "npz": root / "real.npz",
            "stats": root / "stats.npz", "root": root}


@pytest.fixture(scope="module")
def shared_run(images, inception_weights):
    """fid_is and kid (npz reference) on one `InceptionPass`, counting the Inception runs over image folders.

    FID's arithmetic (a 2048x2048 eigendecomposition, tested in test_metrics.py) is replaced by a recorder of
    the features it is given.
    """
    passes, fid_inputs = [], []
    real_inception_features = registry.inception_features

    def counted(image_dir, *args, **kwargs):
        passes.append((os.path.realpath(image_dir), tuple(kwargs["features"])))
        return real_inception_features(image_dir, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "inception_features", counted)
        patch.setattr(registry, "metrics_from_features", lambda features, reference: fid_inputs.append(features)
                      or {"fid": 0.0})
        inception = InceptionPass()
        fid_is = FidInceptionScore(str(images["stats"]), str(inception_weights), IMAGE_SIZE, inception=inception)
        kid = KernelInceptionDistance(str(images["npz"]), str(inception_weights), IMAGE_SIZE, inception=inception)
        for metric in (fid_is, kid):
            metric.check()
        scores = {metric.name: metric.compute(str(images["generated"]), torch.device("cpu"))
                  for metric in (fid_is, kid)}
    return {"scores": scores, "passes": passes, "fid_inputs": fid_inputs, "inception": inception}


# ------------------------------------------------------------------------------------------ registry, defaults


def test_registry_names_kid_and_prc(images):
    settings = MetricSettings(img_size=IMAGE_SIZE, num_images=4, class_num=2, ref_images=str(images["npz"]))
    assert isinstance(EVAL_METRICS["kid"](settings), KernelInceptionDistance)
    assert isinstance(EVAL_METRICS["prc"](settings), PrecisionRecall)
    assert EVAL_METRICS["kid"](settings).name == "kid" and EVAL_METRICS["prc"](settings).name == "prc"


def test_constants_are_torch_fidelity_defaults():
    assert fidelity.FEATURE_KID == FeatureExtractorInceptionV3.get_default_feature_layer_for_metric("kid")
    assert fidelity.FEATURE_KID == fidelity.FEATURE_FID
    assert DEFAULT_FEATURE_EXTRACTOR["kid"] == fidelity.INCEPTION_EXTRACTOR
    assert DEFAULT_FEATURE_EXTRACTOR["prc"] == fidelity.PRC_EXTRACTOR
    assert fidelity.FEATURE_PRC == FeatureExtractorVGG16.get_default_feature_layer_for_metric("prc")
    assert os.path.basename(fidelity.VGG16_WEIGHTS_URL) == "vgg16-397923af.pth"


# ------------------------------------------------------------------------------------------ reference images


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_npz_images_streams_arr_0_in_batches(tmp_path, save):
    array = np.random.RandomState(0).randint(0, 256, (7, 5, 6, 3), dtype=np.uint8)  # [N, H, W, 3]
    save(tmp_path / "ref.npz", arr_0=array, mu=np.zeros(4))
    reader = fidelity.NpzImages(tmp_path / "ref.npz", batch_size=3)
    batches = list(reader)
    assert (reader.num_images, reader.image_size) == (7, (5, 6))
    assert [tuple(batch.shape) for batch in batches] == [(3, 3, 5, 6), (3, 3, 5, 6), (1, 3, 5, 6)]
    assert all(batch.dtype == torch.uint8 and batch.is_contiguous() for batch in batches)
    assert torch.equal(torch.cat(batches), torch.from_numpy(array).permute(0, 3, 1, 2))


def test_npz_reference_holds_the_folder_pixels(images):
    from_npz, count_npz = fidelity.reference_images(images["npz"], batch_size=3)
    from_folder, count_folder = fidelity.reference_images(images["real"], resize=IMAGE_SIZE, num_workers=0)
    assert count_npz == count_folder == NUM_REAL
    assert torch.equal(_concat(from_npz), _concat(from_folder))


def test_reference_folder_is_searched_recursively_and_center_cropped(tmp_path):
    for label in ("a", "b"):
        _write_pngs(tmp_path / "root" / label, _noise_images(seed=3, count=2, size=48)[:, :40])  # 48x40 (WxH)
    batches, count = fidelity.reference_images(tmp_path / "root", resize=16, num_workers=0)
    assert count == 4
    assert tuple(_concat(batches).shape) == (4, 3, 16, 16)


def _write_bad_npz(path, kind: str) -> None:
    if kind == "statistics only":
        np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    elif kind == "float images":
        np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.float32))
    elif kind == "grey images":
        np.savez(path, arr_0=np.zeros((2, 4, 4), np.uint8))
    elif kind == "pickled objects":
        np.savez(path, arr_0=np.array([{"x": 1}, None], dtype=object))
    elif kind == "not a zip":
        path.write_bytes(b"\x89PNG not an archive")
    elif kind == "truncated":
        np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "short array":
        with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (4, 8, 8, 3)})
            member.write(bytes(8 * 8 * 3))  # one image of four


@pytest.mark.parametrize("kind", ["statistics only", "float images", "grey images", "pickled objects", "not a zip",
                                  "truncated", "short array"])
def test_npz_images_refuses_bad_files_naming_them(tmp_path, kind):
    path = tmp_path / "bad.npz"
    _write_bad_npz(path, kind)
    with pytest.raises(ValueError, match="bad.npz is not an ADM-style image batch"):
        fidelity.reference_images(path)


def test_reference_folder_with_an_unreadable_image(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "00000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="00000.png"):
        fidelity.reference_images(tmp_path / "real")


@pytest.mark.parametrize("metric_class", [KernelInceptionDistance, PrecisionRecall])
def test_check_refuses_a_missing_ref_images(tmp_path, metric_class, inception_weights):
    with pytest.raises(fidelity.MissingMetricFile, match="--ref_images"):
        metric_class(None, str(inception_weights), IMAGE_SIZE).check()
    absent = tmp_path / "absent.npz"
    with pytest.raises(fidelity.MissingMetricFile, match="absent.npz") as info:
        metric_class(str(absent), str(inception_weights), IMAGE_SIZE).check()
    assert info.value.path == str(absent)


# ------------------------------------------------------------------------------------------ KID


def test_kid_matches_torch_fidelity(images, inception_weights, shared_run):
    expected = torch_fidelity.calculate_metrics(
        input1=str(images["generated"]), input2=str(images["real"]), cuda=False, kid=True,
        kid_subset_size=NUM_GENERATED, feature_extractor_weights_path=str(inception_weights), save_cpu_ram=True,
        verbose=False)
    ours = shared_run["scores"]["kid"]
    assert ours["kid_subset_size"] == NUM_GENERATED  # the default 1000, capped at the smaller set
    assert ours["kid"] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-5)
    assert ours["kid_std"] == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-4)
    assert ours["kid"] > 0.0 and ours["kid_std"] > 0.0


def test_fid_is_and_kid_share_one_inception_pass(images, shared_run):
    generated = os.path.realpath(images["generated"])
    assert shared_run["passes"] == [(generated, tuple(sorted(fidelity.INCEPTION_FEATURES)))]
    (features,) = shared_run["fid_inputs"]
    assert {name: tuple(value.shape) for name, value in features.items()} == {
        fidelity.FEATURE_ISC: (NUM_GENERATED, 1008), fidelity.FEATURE_FID: (NUM_GENERATED, 2048)}
    assert shared_run["inception"]._features == {}  # released once both metrics have read it


def test_kernel_inception_distance_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        fidelity.kernel_inception_distance(torch.randn(1, 5), torch.randn(4, 5))


# ------------------------------------------------------------------------------------------ precision/recall


def test_precision_recall_matches_torch_fidelity(images, tiny_vgg_weights):
    metric = PrecisionRecall(str(images["real"]), str(tiny_vgg_weights), IMAGE_SIZE)
    metric.check()
    ours = metric.compute(str(images["generated"]), torch.device("cpu"))
    expected = torch_fidelity.calculate_metrics(
        input1=str(images["generated"]), input2=str(images["real"]), cuda=False, prc=True,
        feature_extractor_weights_path=str(tiny_vgg_weights), verbose=False)
    assert ours == {"prc_precision": expected["precision"], "prc_recall": expected["recall"]}


def test_prc_check_refuses_missing_or_foreign_weights(images, tiny_vgg_weights, inception_weights, tmp_path):
    absent = tmp_path / "vgg16.pth"
    with pytest.raises(fidelity.MissingMetricFile, match="vgg16-397923af.pth") as info:
        PrecisionRecall(str(images["npz"]), str(absent), IMAGE_SIZE).check()
    assert info.value.path == str(absent) and "--prc_weights" in str(info.value)
    with pytest.raises(ValueError, match="is not a weights file of torch-fidelity's vgg16 network"):
        PrecisionRecall(str(images["npz"]), str(inception_weights), IMAGE_SIZE).check()
    weights = torch.load(tiny_vgg_weights, weights_only=True)
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("inf"))
    torch.save(weights, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match=f"inf.pth: tensor {name} holds non-finite values"):
        PrecisionRecall(str(images["npz"]), str(tmp_path / "inf.pth"), IMAGE_SIZE).check()


def test_precision_recall_blocks_match_the_full_matrices():
    generator = torch.Generator().manual_seed(0)
    generated, reference = torch.randn(30, 6, generator=generator), torch.randn(25, 6, generator=generator) + 0.5
    full = prc_features_to_metric(generated, reference, save_cpu_ram=False, verbose=False)
    assert fidelity.precision_recall(generated, reference, batch_size=7) == (full["precision"], full["recall"])


def test_precision_recall_needs_more_images_than_neighbours():
    with pytest.raises(ValueError, match="more than 3 images"):
        fidelity.precision_recall(torch.randn(3, 4), torch.randn(10, 4))
