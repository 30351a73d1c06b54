"""What the tests share: tiny runs and the original's reference execution, the preloading launcher, end-to-end
run helpers, and the repository's paths."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
