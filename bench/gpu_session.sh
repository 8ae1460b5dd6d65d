#!/usr/bin/env bash
# What a session with a lent GPU runs first, through the device tool, from the repo root:
#   bash bench/gpu_session.sh tests              # GPU-only kernel tests (bf16, determinism)
#   bash bench/gpu_session.sh bench attention mlp # some benchmarks (or: all)
# Installs kcap offline (the GPU image has torch, triton, pybind11, safetensors, ...), and
# copies logs and bench/results/*-gpu-* into $OUT so they come back. Each device call is
# limited to 10 minutes: split the benchmarks over calls.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kcap-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
stage=${1:-tests}
shift || true
if [ "$stage" = tests ]; then
  python3 -m pytest tests/kernels tests/models -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
elif [ "$stage" = bench ]; then
  subjects=("$@")
  [ "${subjects[0]:-all}" = all ] && subjects=(attention mlp quant_matmul moe train)
  for subject in "${subjects[@]}"; do
    python3 -m bench "$subject" 2>&1 | tee "$OUT/bench-$subject.log"
  done
  cp bench/results/*-gpu-* "$OUT/" 2>/dev/null || true
else
  echo "usage: bash bench/gpu_session.sh tests | bench [all | SUBJECT...]" >&2
  exit 2
fi
