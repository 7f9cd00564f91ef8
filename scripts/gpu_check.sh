#!/usr/bin/env bash
# GPU check for a lent H100/H200 (bf16 parity vs transformers + 2-layer Mixtral-8x7B decode benchmark).
# Usage: scripts/gpu_check.sh [--dry-run] [--out DIR] [--batches 1,16,64]
#   --dry-run: the same code with tiny shapes on CPU (~30 s; CI runs it).
# JSON lands in --out, default $OUT (the device machine's output folder) or ./gpu_check_out.
# Must finish in under 8 minutes on the GPU; a hard limit of 7.5 minutes is applied here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3  # the device image's python3 holds torch + transformers
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout --signal=INT --kill-after=15 450 "$py" scripts/gpu_check.py "$@"
