#!/usr/bin/env bash
# The test suite on CPU: creates .venv if needed, installs the pinned requirements, lints, runs pytest.
set -euo pipefail
source "$(dirname "$0")/venv.sh" requirements-dev.txt
.venv/bin/python -m ruff check .
# One OpenMP thread per process: the torchrun ranks of the tests compete for the 2 cores of a CI machine.
# Arguments go to pytest, e.g. -m "not e2e and not compile" for the fast unit set.
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -m pytest -q "$@"
