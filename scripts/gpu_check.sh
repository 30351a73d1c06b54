#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU: the CUDA smoke suite (tests/gpu, pytest -m gpu),
# then the throughput benchmark (benchmarks/gpu.sh). Prints every figure docs/gpu.md records.
#
#     bash scripts/gpu_check.sh [python]      # default: .venv/bin/python if present, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 1
export PYTHONUNBUFFERED=1  # every figure reaches a log or a pipe as it is printed, even if the run is cut short
status=0
echo "== CUDA smoke suite ($SECONDS s)"
"$PYTHON" -m pytest -m gpu -s -q -p no:cacheprovider --durations=0 tests/gpu || status=1
bash benchmarks/gpu.sh "$PYTHON" || status=1
exit $status
