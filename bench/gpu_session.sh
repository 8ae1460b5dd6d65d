#!/usr/bin/env bash
# What a session with a lent GPU runs, through the device tool, from the repo root:
#   bash bench/gpu_session.sh tests [PYTEST ARGS]   # GPU kernel, model and pack tests (bf16, CUDA router)
#   bash bench/gpu_session.sh bench attention mlp   # some benchmarks (or: all)
#   bash bench/gpu_session.sh experiment r1 500     # r1 --preset gpu for 500 s (resumable)
#   bash bench/gpu_session.sh priority              # first call of a 15-minute session (~9 min)
#   bash bench/gpu_session.sh tuning                # trial autotuning candidates: tested, timed
# Installs kcap offline (the GPU image has torch, triton, pybind11, safetensors, ...). Logs go
# to $LOGS (default $OUT; bundled as logs.tgz past 8 files); bench/results/*-gpu-* files are
# copied there too. Each device call is limited to 10 minutes: split the benchmarks over
# calls, and bound each stage with `timeout` so that the logs survive a stage that runs long.
set -uo pipefail
export PYTHONUNBUFFERED=1
LOGS=${LOGS:-${OUT:-/tmp/kcap-gpu}}
mkdir -p "$LOGS"
# once per machine (`import kcap` alone proves nothing: the repo root is on sys.path)
if [ ! -e /tmp/kcap-installed ]; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$LOGS/install.log" 2>&1 \
    || { echo "install failed:"; tail -20 "$LOGS/install.log"; exit 1; }
  # wheels carried from the project machine (no network here): liger-kernel for the
  # linear cross-entropy comparison (`pip download liger-kernel --no-deps -d bench/wheels`)
  for wheel in bench/wheels/*.whl; do
    [ -e "$wheel" ] && python3 -m pip install -q --no-deps "$wheel" >> "$LOGS/install.log" 2>&1
  done
  touch /tmp/kcap-installed
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import kcap.models.router as r; print('cpp router: cpu', r.cpp_available('cpu'), 'cuda', r.cpp_available('cuda'))"
} | tee "$LOGS/gpu.txt"
stage=${1:-tests}
shift || true
if [ "$stage" = tests ]; then
  # straight to the file (no pipe): a stage killed by `timeout` still leaves its log
  # margins of the error rule (tests/kernels/precision.py) on this GPU: never measured there yet
  KCAP_MARGIN_LOG="$LOGS/gpu-margins.jsonl" \
  python3 -m pytest tests/kernels tests/models tests/pack/test_gpu.py tests/test_lora.py -v -p no:cacheprovider --durations=15 -rfE \
    --tb=short "$@" > "$LOGS/gpu-tests.log" 2>&1
  grep -E "passed|failed|error" "$LOGS/gpu-tests.log" | tail -3
elif [ "$stage" = bench ]; then
  subjects=("$@")
  [ "${subjects[0]:-all}" = all ] && subjects=(profile attention mlp quant_matmul moe train pack cross_entropy)
  for subject in "${subjects[@]}"; do
    python3 -m bench "$subject" 2>&1 | tee "$LOGS/bench-$subject.log"
  done
  find bench/results -name "*-gpu-*" -newer "$LOGS/gpu.txt" -exec cp {} "$LOGS/" \; 2>/dev/null || true  # this call's
elif [ "$stage" = priority ]; then
  # What only a GPU shows, most decisive first, in one call under the 10-minute limit (run it
  # with timeout_s 600): the untested CUDA paths (packs, the fused loss, the kernels' vmap
  # rules), then the pack's speed-up and MFU (gpt2-4-4, M = 1 and 16, eager / compiled / CUDA
  # graphs, data share), the profile of the solo step, the fused loss against eager and Liger,
  # the W4A16 kernels' tests (gradients through the quantized matmuls first), W4A16 at
  # M = 1-16 (eager and graphed) against cuBLAS. Stage limits add up to 550 s.
  KCAP_MARGIN_LOG="$LOGS/gpu-margins.jsonl" timeout 140 \
  python3 -m pytest tests/pack/test_gpu.py tests/kernels/test_cross_entropy.py \
    tests/kernels/test_mlp_elementwise.py "tests/kernels/test_attention.py::test_vmap_folds_the_mapped_dim_into_the_batch" \
    -v -p no:cacheprovider -rfE --tb=short > "$LOGS/gpu-tests.log" 2>&1
  grep -E "passed|failed|error" "$LOGS/gpu-tests.log" | tail -3
  for step in "pack 155" "profile 75" "cross_entropy 85" "tests-w4a16 50" "quant_matmul 45"; do
    set -- $step
    if [ "$1" = tests-w4a16 ]; then  # gradients first: a wrong one is silent in training
      KCAP_MARGIN_LOG="$LOGS/gpu-margins.jsonl" timeout "$2" python3 -m pytest \
        "tests/kernels/test_quant_matmul.py::test_gradients_reach_x_and_bias" \
        "tests/test_lora.py::test_adapter_gradients_through_the_quant_kernels_match_the_torch_path" \
        tests/kernels/test_w4a16.py -k "not group_sizes" -v -p no:cacheprovider -rfE --tb=short \
        > "$LOGS/gpu-tests-w4a16.log" 2>&1
      echo "tests w4a16: exit $? (124: stopped at $2 s)"
      continue
    fi
    timeout "$2" python3 -m bench "$1" --quick > "$LOGS/bench-$1.log" 2>&1
    echo "bench $1: exit $? (124: stopped at $2 s)"
  done
  find bench/results -name "*-gpu-*" -newer "$LOGS/gpu.txt" -exec cp {} "$LOGS/" \; 2>/dev/null || true  # this call's
elif [ "$stage" = tuning ]; then
  # The trial autotuning candidates (kernels/runtime.py: KCAP_TRIAL_CANDIDATES=1), chosen
  # offline (bench registers): first each one alone through the GPU tests, then timed by
  # autotuning beside the listed candidates at the benches' shapes (attention, fused MLP;
  # --quick). The *-trials result files' "Autotuning" tables give each candidate's time at
  # each shape: a trial that passes and wins somewhere moves into its kernel's list. Stage
  # limits add up to 540 s: run it with timeout_s 600.
  KCAP_MARGIN_LOG="$LOGS/gpu-margins.jsonl" timeout 180 \
  python3 -m pytest tests/kernels/test_attention.py tests/kernels/test_gated_mlp.py \
    -k "every_autotune and trial" -v -p no:cacheprovider -rfE --tb=short > "$LOGS/gpu-tests-trials.log" 2>&1
  grep -E "passed|failed|error" "$LOGS/gpu-tests-trials.log" | tail -3
  for step in "attention 240" "mlp 120"; do
    set -- $step
    KCAP_TRIAL_CANDIDATES=1 timeout "$2" python3 -m bench "$1" --quick > "$LOGS/bench-$1-trials.log" 2>&1
    echo "bench $1 with trials: exit $? (124: stopped at $2 s)"
  done
  find bench/results -name "*-gpu-*" -newer "$LOGS/gpu.txt" -exec cp {} "$LOGS/" \; 2>/dev/null || true  # this call's
elif [ "$stage" = experiment ]; then
  # An experiment's gpu preset, as much as fits in the time given; the sweep lives on the
  # machine (checkpoints are too big to bring back) and continues on the next call while the
  # machine stays warm. Four solo runs share the GPU (each alone is bound by per-step
  # overhead). What comes back: the table, figures, results.md and every run's log and report.
  key=${1:-r1}; seconds=${2:-500}
  sweep=/tmp/kcap-sweeps/$key-gpu
  timeout "$seconds" kcap experiment run "$key" --preset gpu --out "$sweep" --gpus 0 --per-gpu 4 \
    --no-progress > "$LOGS/experiment-$key.log" 2>&1
  kcap experiment status "$sweep" | tee "$LOGS/experiment-$key-status.txt"
  kcap experiment report "$sweep" >> "$LOGS/experiment-$key.log" 2>&1
  mkdir -p "$LOGS/$key-gpu"
  (cd "$sweep" && cp -r --parents results.jsonl results.md figures runs/*/log.jsonl \
    runs/*/config.json runs/*/report.json "$LOGS/$key-gpu/" 2>/dev/null) || true
else
  echo "usage: bash bench/gpu_session.sh tests [PYTEST ARGS] | bench [all | SUBJECT...] | priority | tuning | experiment KEY [SECONDS]" >&2
  exit 2
fi
# The device tool brings back at most 8 files from $OUT (two folders down): more go back as
# one archive, gpu.txt beside it
if [ "$(find "$LOGS" -type f | wc -l)" -gt 8 ]; then
  tar czf /tmp/kcap-logs.tgz -C "$LOGS" . && find "$LOGS" -mindepth 1 ! -name gpu.txt -delete \
    && mv /tmp/kcap-logs.tgz "$LOGS/logs.tgz" && echo "logs: $LOGS/logs.tgz (tar xzf it)"
fi
