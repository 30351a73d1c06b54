"""FID / Inception Score plumbing (util/eval/fidelity.py), ADM .npz export and the reference-statistics CLI.

The real Inception weights cannot be downloaded here; the `inception_weights` fixture (conftest.py) writes a
random-weight file with torch-fidelity's key names and shapes, loaded through the real weights-path code.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image

from tests.support import REPO_ROOT
from tests.support.image_sets import NUM_IMAGES, noise_images, write_pngs
from tools import make_fid_stats
from util.eval import fidelity
from util.eval.npz_export import write_adm_npz


def _random_statistics(dim: int, seed: int):
    """A random mean and a well-conditioned SPD covariance (float64)."""
    rng = np.random.RandomState(seed)
    factor = rng.randn(dim, dim)
    return rng.randn(dim), factor @ factor.T / dim + 0.1 * np.eye(dim)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """Textbook FID with scipy's matrix square root (ADM / pytorch-fid formula)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------------
# Frechet distance and Inception Score arithmetic


def test_frechet_distance_matches_scipy_sqrtm():
    mu1, sigma1 = _random_statistics(64, seed=0)
    mu2, sigma2 = _random_statistics(64, seed=1)
    expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert expected > 1.0
    assert fidelity.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_statistics_is_zero():
    mu, sigma = _random_statistics(64, seed=3)
    assert abs(fidelity.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_promotes_mismatched_dtypes():
    mu1, sigma1 = _random_statistics(16, seed=4)
    mu2, sigma2 = _random_statistics(16, seed=5)
    mixed = fidelity.frechet_distance(mu1.astype(np.float32), sigma1, mu2, sigma2.astype(np.float32))
    assert mixed == pytest.approx(_scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-5)


@pytest.mark.parametrize("shapes", [((8,), (8, 8), (9,), (9, 9)), ((8,), (8, 7), (8,), (8, 8)),
                                    ((8, 1), (8, 8), (8, 1), (8, 8))])
def test_frechet_distance_rejects_bad_shapes(shapes):
    arrays = [np.ones(shape) for shape in shapes]
    with pytest.raises(ValueError, match="mu|dimensions"):
        fidelity.frechet_distance(*arrays)


def test_inception_score_matches_numpy_reference():
    logits = np.random.RandomState(6).randn(40, 7) * 3
    shuffled = logits[np.random.RandomState(fidelity.ISC_RNG_SEED).permutation(40)]
    probs = np.exp(shuffled) / np.exp(shuffled).sum(axis=1, keepdims=True)
    scores = []
    for split in np.split(probs, 10):
        kl = (split * (np.log(split) - np.log(split.mean(axis=0, keepdims=True)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    mean, std = fidelity.inception_score(torch.from_numpy(logits).float())
    assert mean == pytest.approx(np.mean(scores), rel=1e-5)
    assert std == pytest.approx(np.std(scores), rel=1e-4)


def test_inception_score_of_identical_predictions_is_one():
    mean, std = fidelity.inception_score(torch.randn(1, 5).repeat(20, 1))
    assert mean == pytest.approx(1.0, abs=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_with_fewer_images_than_splits_is_finite():
    mean, _ = fidelity.inception_score(torch.randn(4, 5) * 3)
    assert np.isfinite(mean) and mean >= 1.0


# ---------------------------------------------------------------------------------------------------------
# Reference statistics files


def test_reference_statistics_roundtrip_uses_adm_dtypes(tmp_path):
    mu, sigma = _random_statistics(10, seed=7)
    path = tmp_path / "sub" / "custom_stats"
    fidelity.save_reference_statistics(path, mu, sigma)
    assert sorted(os.listdir(path.parent)) == ["custom_stats"]  # exact name, no temporary file left
    stats = fidelity.load_reference_statistics(path)
    assert stats["mu"].dtype == np.float32 and stats["sigma"].dtype == np.float64
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-6)
    np.testing.assert_array_equal(stats["sigma"], sigma)


def test_load_reference_statistics_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.npz"
    with pytest.raises(fidelity.MissingMetricFile, match="nowhere.npz") as info:
        fidelity.load_reference_statistics(path)
    assert info.value.path == str(path)
    assert "make_fid_stats.py" in str(info.value)


def test_load_reference_statistics_rejects_sample_batch(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="'mu'"):
        fidelity.load_reference_statistics(path)


def test_load_reference_statistics_rejects_inconsistent_shapes(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, mu=np.zeros(4, dtype=np.float32), sigma=np.eye(5))
    with pytest.raises(ValueError, match="sigma"):
        fidelity.load_reference_statistics(path)


@pytest.mark.parametrize("img_size, name, source", [(256, "adm_in256_stats.npz", "VIRTUAL_imagenet256_labeled"),
                                                    (512, "VIRTUAL_imagenet512.npz", fidelity.TRANSDIFF_REF_512_URL)])
def test_default_fid_stats_paths_and_their_download_hints(img_size, name, source):
    path = fidelity.default_fid_stats_path(img_size)
    assert Path(path) == REPO_ROOT / "fid_stats" / name
    with pytest.raises(fidelity.MissingMetricFile, match=source):
        fidelity.load_reference_statistics(Path(path).with_name("absent") / name)


def test_default_fid_stats_path_unknown_size_is_none():
    assert fidelity.default_fid_stats_path(128) is None


# ---------------------------------------------------------------------------------------------------------
# Inception weights resolution and early failures


def test_resolve_inception_weights_explicit_missing_path(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(fidelity.MissingMetricFile, match="absent.pth") as info:
        fidelity.resolve_inception_weights(path)
    assert tf_inception.URL_INCEPTION_V3 in str(info.value)


def test_resolve_inception_weights_uses_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(tf_inception.URL_INCEPTION_V3)
    with pytest.raises(fidelity.MissingMetricFile, match=str(cached)):
        fidelity.resolve_inception_weights()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert fidelity.resolve_inception_weights() == str(cached)


@pytest.fixture
def forbid_image_work(monkeypatch):
    """Make any Inception feature extraction fail the test."""
    def fail(*args, **kwargs):
        raise AssertionError("image work started before the metric files were checked")
    monkeypatch.setattr(fidelity, "inception_features", fail)
    monkeypatch.setattr(fidelity, "load_inception", fail)


def test_compute_fid_is_missing_weights_fails_before_image_work(tmp_path, folders, forbid_image_work):
    stats = tmp_path / "stats.npz"
    fidelity.save_reference_statistics(stats, *_random_statistics(2048, seed=8))
    with pytest.raises(fidelity.MissingMetricFile, match="no_weights.pth"):
        fidelity.compute_fid_is(folders["noise"], stats, "cpu", weights_path=tmp_path / "no_weights.pth")


def test_compute_fid_is_missing_stats_fails_before_image_work(tmp_path, folders, inception_weights,
                                                               forbid_image_work):
    with pytest.raises(fidelity.MissingMetricFile, match="no_stats.npz"):
        fidelity.compute_fid_is(folders["noise"], tmp_path / "no_stats.npz", "cpu", weights_path=inception_weights)


# ---------------------------------------------------------------------------------------------------------
# End to end with the random-weight Inception network


def test_inception_features_shapes_and_dtype(noise_features):
    assert noise_features[fidelity.FEATURE_ISC].shape == (NUM_IMAGES, 1008)
    assert noise_features[fidelity.FEATURE_FID].shape == (NUM_IMAGES, 2048)
    assert all(value.dtype == torch.float32 for value in noise_features.values())
    assert noise_features[fidelity.FEATURE_FID].std(dim=0).mean() > 1e-3  # images are told apart


def test_in_memory_batches_match_folder_features(inception_weights, noise_features):
    extractor = fidelity.load_inception(torch.device("cpu"), inception_weights)
    images = torch.from_numpy(noise_images(seed=1)[:4]).permute(0, 3, 1, 2)  # [4, 3, H, W] uint8
    features = fidelity.features_from_batches(extractor, [images[:3], images[3:]])
    for name, value in features.items():
        torch.testing.assert_close(value, noise_features[name][:4], rtol=1e-4, atol=1e-5)


def test_mixed_image_sizes_need_resize(tmp_path, inception_weights):
    write_pngs(tmp_path / "a", noise_images(seed=9, count=1, size=20))
    Image.fromarray(noise_images(seed=10, count=1, size=28)[0]).save(tmp_path / "a" / "big.png")
    with pytest.raises(ValueError, match="resize"):
        fidelity.inception_features(tmp_path / "a", "cpu", weights_path=inception_weights, num_workers=0)
    features = fidelity.inception_features(tmp_path / "a", "cpu", weights_path=inception_weights, num_workers=0,
                                          resize=16, features=(fidelity.FEATURE_FID,))
    assert features[fidelity.FEATURE_FID].shape == (2, 2048)


# ---------------------------------------------------------------------------------------------------------
# ADM .npz export


def test_write_adm_npz_is_uint8_nhwc_seeded_permutation(tmp_path):
    images = noise_images(seed=11, count=7, size=6)
    write_pngs(tmp_path / "pngs", images)
    out = tmp_path / "out" / "samples.npz"
    assert write_adm_npz(tmp_path / "pngs", out, shuffle_seed=3, chunk_size=3) == 7
    with np.load(out) as data:
        assert data.files == ["arr_0"]
        packed = data["arr_0"]
    assert packed.dtype == np.uint8 and packed.shape == (7, 6, 6, 3)
    np.testing.assert_array_equal(packed, images[np.random.RandomState(3).permutation(7)])
    assert os.listdir(out.parent) == ["samples.npz"]


def test_write_adm_npz_mixed_sizes_leaves_no_file(tmp_path):
    write_pngs(tmp_path / "pngs", noise_images(seed=12, count=2, size=6))
    Image.fromarray(noise_images(seed=13, count=1, size=8)[0]).save(tmp_path / "pngs" / "odd.png")
    with pytest.raises(ValueError, match=r"is \dx\d \(WxH\), expected \dx\d"):
        write_adm_npz(tmp_path / "pngs", tmp_path / "out.npz", chunk_size=2)
    assert sorted(os.listdir(tmp_path)) == ["pngs"]


# ---------------------------------------------------------------------------------------------------------
# tools/make_fid_stats.py


def test_make_fid_stats_main_reports_missing_weights(tmp_path):
    with pytest.raises(fidelity.MissingMetricFile, match="absent.pth"):
        make_fid_stats.main(["--image_dir", str(tmp_path), "--out", str(tmp_path / "s.npz"),
                             "--inception_weights", str(tmp_path / "absent.pth")])
    assert not (tmp_path / "s.npz").exists()


def test_features_in_parts_merge_to_one_pass_bit_for_bit(inception_weights, tmp_path):
    """What each of 2 ranks extracts (`part`: batches 0 and 2, batch 1), merged, equals one pass: the same batches
    of images in order, the last one partial (5 images in batches of 2)."""
    write_pngs(tmp_path / "noise", noise_images(seed=1, count=5))
    extract = dict(batch_size=2, weights_path=inception_weights, num_workers=0)
    one = fidelity.inception_features(tmp_path / "noise", "cpu", **extract)
    pieces = [fidelity.inception_features(tmp_path / "noise", "cpu", part=(k, 2), **extract) for k in range(2)]
    assert [len(piece[fidelity.FEATURE_FID]) for piece in pieces] == [3, 2]
    merged = fidelity.merge_feature_parts(pieces, batch_size=2)
    assert merged.keys() == one.keys()
    for name in one:
        assert torch.equal(merged[name], one[name]), name
