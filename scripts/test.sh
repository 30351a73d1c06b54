#!/usr/bin/env bash
# Creates .venv if needed, installs the pinned requirements, lints, and runs the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m ruff check .
# One OpenMP thread per process: the CI machine has 2 cores shared by the torchrun ranks of the tests.
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -m pytest -q "$@"
