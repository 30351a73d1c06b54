"""Packaging facts the README promises: one set of pins, allowed dependencies only, CI runs the README command."""
import re

from tests.support import REPO_ROOT

ROOT = REPO_ROOT
ALLOWED = {"torch", "torchvision", "timm", "numpy", "scipy", "pillow", "tqdm", "torch-fidelity", "tensorboard",
           "scikit-learn", "huggingface_hub"}


def pins(lines):
    return dict(re.match(r"^\s*-?\s*([A-Za-z0-9_.-]+)==(\S+)\s*$", line).groups()
                for line in lines if re.match(r"^\s*-?\s*[A-Za-z0-9_.-]+==", line))


def test_requirements_and_environment_pin_the_same_versions():
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    environment = pins((ROOT / "environment.yaml").read_text().splitlines())
    assert requirements == environment
    assert set(requirements) <= ALLOWED


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_quickstart_is_the_first_block_under_the_quickstart_heading():
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"^## .*Quickstart.*$", readme, maxsplit=1, flags=re.M)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    assert command == "bash scripts/quickstart.sh"
    assert (ROOT / "scripts" / "quickstart.sh").is_file()
