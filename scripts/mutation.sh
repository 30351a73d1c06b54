#!/usr/bin/env bash
# Mutation testing of the modules that hold conventions and state ([tool.mutmut] in pyproject.toml) against the
# fast unit tests, from scratch, then each module's score. A tool for developers, not part of .ci/run.
# Arguments go to `mutmut run`, e.g. "util.eval.layout*" for one module's mutants (the rest stay unchecked).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements-dev.txt
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
rm -rf mutants
log=$(mktemp)
.venv/bin/mutmut run --max-children "${MUTATION_JOBS:-$(nproc)}" "$@" > "$log" 2>&1 || { tail -c 2000 "$log"; exit 1; }
.venv/bin/mutmut results --all true | .venv/bin/python tools/mutation_scores.py
