"""Common pytest fixtures: the golden-tensor folder, a small VAE state_dict, stand-in Inception and VGG16 weights
and a single-threaded torch."""
import sys
from pathlib import Path

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the project's packages, and `tests.support`

# Every process of the CI machine competes for its two cores; one thread per process avoids
# OpenMP oversubscription, which ran 4-6x slower than a single thread here.
torch.set_num_threads(1)


GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
pytest_plugins = ("tests.support.image_sets",)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden tensors of the original implementation kept in the repository (see tests/golden/README.md)."""
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def ch32_state_dict() -> dict:
    """A small-width (ch=32) KL-16 VAE state_dict: seeded default init, stored as float16.

    It stands in for a real ``kl16.ckpt`` in the checkpoint-loading tests (the real one is 266 MB; the
    original's small-width VAE weights are not kept in tests/golden, see its README).
    """
    from models.vae import AutoencoderKL
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoencoderKL(ch=32)
    return {key: tensor.half() for key, tensor in model.state_dict().items()}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weight ``inception-v3-compat`` weights file with torch-fidelity's exact keys and shapes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        from util.eval import fidelity
        net = tf_inception.FeatureExtractorInceptionV3(fidelity.INCEPTION_EXTRACTOR, list(fidelity.INCEPTION_FEATURES))
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


class TinyVGG(nn.Module):
    """torchvision's VGG layout (features, avgpool, 7-layer classifier) at toy width: fc2_relu has 32 features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 32), nn.ReLU(),
                                        nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))  # [B, 10]


@pytest.fixture
def tiny_vgg_weights(tmp_path, monkeypatch):
    """A TinyVGG weights file; torchvision.models.vgg16 builds TinyVGG for torch-fidelity's vgg16 extractor."""
    monkeypatch.setattr("torchvision.models.vgg16", lambda *args, **kwargs: TinyVGG())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state_dict = TinyVGG().state_dict()
    torch.save(state_dict, tmp_path / "vgg16-tiny.pth")
    return tmp_path / "vgg16-tiny.pth"


FOLDER_MARKERS = {"e2e": "e2e", "compile": "compile", "gpu": "gpu"}  # tests/<folder>/ -> marker


def pytest_collection_modifyitems(config, items):
    """Markers follow folders: tests/e2e/ is `e2e`, tests/compile/ `compile`, tests/gpu/ `gpu`; tests/unit/ has none."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        folder = Path(item.fspath).resolve().relative_to(tests_dir).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])


def pytest_runtest_setup(item):
    """The CUDA smoke suite needs a GPU: skipped, with the reason, where torch sees none."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the GPU smoke suite runs on a GPU machine (bash scripts/gpu_check.sh, "
                    "docs/gpu.md)")
