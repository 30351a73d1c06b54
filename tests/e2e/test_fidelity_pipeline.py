"""FID/IS end to end on small image folders: ours against torch-fidelity's own pipeline, and the
reference-statistics script, through the stand-in Inception weights (tests/conftest.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_fidelity

from tests.support import REPO_ROOT
from tests.support.image_sets import NUM_IMAGES, noise_images, smooth_images, write_pngs
from util.eval import fidelity


def test_compute_fid_is_end_to_end(tmp_path, inception_weights, folders, noise_features, smooth_statistics):
    own_stats, other_stats = tmp_path / "noise.npz", tmp_path / "smooth.npz"
    noise = fidelity.statistics_from_features(noise_features[fidelity.FEATURE_FID])
    fidelity.save_reference_statistics(own_stats, noise["mu"], noise["sigma"])
    fidelity.save_reference_statistics(other_stats, smooth_statistics["mu"], smooth_statistics["sigma"])

    result = fidelity.compute_fid_is(folders["noise"], other_stats, torch.device("cpu"), batch_size=8,
                                    weights_path=inception_weights, num_workers=0)
    assert set(result) == {"fid", "inception_score", "inception_score_std", "num_images"}
    assert result["num_images"] == NUM_IMAGES
    assert np.isfinite(result["fid"]) and result["fid"] > 1.0
    # With 12 images in 10 splits most splits hold one image, so IS sits just above its minimum of 1.
    assert np.isfinite(result["inception_score"]) and result["inception_score"] >= 1.0 - 1e-9

    from_features = fidelity.metrics_from_features(noise_features, fidelity.load_reference_statistics(own_stats))
    assert abs(from_features["fid"]) < 1e-3 * result["fid"]
    assert from_features["inception_score"] == pytest.approx(result["inception_score"], rel=1e-5)


def test_matches_torch_fidelity_calculate_metrics(inception_weights, folders, noise_features, smooth_statistics):
    expected = torch_fidelity.calculate_metrics(
        input1=str(folders["noise"]), input2=str(folders["smooth"]), cuda=False, isc=True, fid=True,
        feature_extractor_weights_path=str(inception_weights), batch_size=8, save_cpu_ram=True, verbose=False)
    ours = fidelity.metrics_from_features(noise_features, smooth_statistics)
    assert ours["fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    assert ours["inception_score"] == pytest.approx(expected["inception_score_mean"], rel=1e-9)
    assert ours["inception_score_std"] == pytest.approx(expected["inception_score_std"], rel=1e-6)


def test_make_fid_stats_script_on_imagefolder(tmp_path, inception_weights):
    write_pngs(tmp_path / "data" / "class_a", noise_images(seed=14, count=2, size=20))
    write_pngs(tmp_path / "data" / "class_b", smooth_images(seed=15, count=1, size=30))
    out = tmp_path / "stats" / "custom.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "tools/make_fid_stats.py", "--image_dir", str(tmp_path / "data"), "--out", str(out),
         "--inception_weights", str(inception_weights), "--device", "cpu", "--resize", "16", "--num_workers", "0",
         "--quiet"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "from 3 images" in completed.stdout
    stats = fidelity.load_reference_statistics(out)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert stats["mu"].dtype == np.float32 and stats["sigma"].dtype == np.float64
