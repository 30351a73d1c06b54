#!/usr/bin/env bash
# The main job on CPU: creates .venv if needed, installs the pinned requirements, then trains, samples and
# evaluates a tiny TransDiff on scikit-learn's handwritten digits (quickstart.py; options pass through).
set -euo pipefail
source "$(dirname "$0")/venv.sh" requirements.txt
.venv/bin/python quickstart.py "$@"
