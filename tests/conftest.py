"""Shared pytest fixtures: the parity folder and a deterministic, single-threaded torch."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Two cores are shared by every process on the CI machine; one thread per process avoids
# OpenMP oversubscription, which ran 4-6x slower than a single thread here.
torch.set_num_threads(1)


def _parity_dir() -> Path:
    explicit = os.environ.get("TRANSDIFF_PARITY_DIR")
    if explicit:
        return Path(explicit)
    return REPO_ROOT.parent / "shared" / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    path = _parity_dir()
    if not (path / "tiny_model.pt").is_file():
        pytest.fail(f"golden tensors not found in {path}; set TRANSDIFF_PARITY_DIR to the shared/parity folder")
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weight ``inception-v3-compat`` weights file with torch-fidelity's exact keys and shapes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        from util import metrics
        net = tf_inception.FeatureExtractorInceptionV3(metrics.INCEPTION_EXTRACTOR, list(metrics.INCEPTION_FEATURES))
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for name, tensor in net.state_dict().items():
        if name.endswith(".weight") and tensor.dim() > 1:
            # He-scaled conv/fc weights keep activations O(1); PyTorch's default init shrinks them to ~1e-8.
            tensor = torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5
        state_dict[name] = tensor
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(state_dict, path)
    return path
