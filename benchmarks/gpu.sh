#!/usr/bin/env bash
# TransDiff-B and -L on one CUDA GPU: the model alone, eager against compiled (compare.py: training and sampling
# images/s, model TFLOP/s and MFU, peak memory), then what a user gets (production.py: main.py's whole training
# and evaluation paths through a 1-rank torchrun), then the memory prediction of a training step against the
# caching allocator's allocated and reserved peaks (memory.py --check; docs/gpu.md, "Memory"); B first, then L.
# Batches as in the original README: training 32 per GPU with diffusion_batch_mul 4, sampling --eval_bsz 256 at
# cfg 1.5 and 100 steps. Not yet run on a GPU (docs/gpu.md).
#
#     bash benchmarks/gpu.sh [python]        # default: .venv/bin/python if present, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), torch.__version__)"
for model in transdiff_base transdiff_large; do  # B's figures complete before L's start
  echo "== $model: eager vs compiled ($SECONDS s)"
  "$PYTHON" benchmarks/compare.py --pair eager,compiled --model "$model" --device cuda --precision bf16 --rounds 1 \
    --train_batch 32 --train_steps 10 --sample_batches 256 --sample_steps 10
  echo "== $model: production path ($SECONDS s)"
  "$PYTHON" benchmarks/production.py --model "$model" --device cuda
  echo "== $model: memory prediction against the allocator ($SECONDS s)"
  "$PYTHON" benchmarks/memory.py --check --device cuda --model "$model" --batch_size 16 --precision bf16
done
echo "== done ($SECONDS s)"
