#!/usr/bin/env bash
# The protocol's GPU measurements (../shared/BENCHMARK-PROTOCOL.md), one JSON per run in OUT_DIR.
#
#   benchmarks/gpu_suite.sh [OUT_DIR] [STEP...]
#
# STEPs (default: all single-GPU ones): seed64 sharegpt1000 latency tp2
# Workload files come from $WORKLOADS (default .carry/bench-workloads), made on a CPU machine with
#   strata bench make-workload seed64 --out .carry/bench-workloads/seed64.json
#   strata bench make-workload sharegpt1000 --out .carry/bench-workloads/sharegpt1000.json
# The strata command is $STRATA (default: `strata` if on PATH, else `python -m strata.cli` with src/ on
# PYTHONPATH). Extra engine flags for every run: $ENGINE_ARGS. Each step is its own process (fresh engine).
set -u
OUT=${1:-benchmarks/results}
shift || true
STEPS=${*:-seed64 sharegpt1000 latency}
W=${WORKLOADS:-.carry/bench-workloads}
if [ -z "${STRATA:-}" ]; then
  if command -v strata >/dev/null 2>&1; then STRATA=strata; else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; STRATA="python -m strata.cli"; fi
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/NVIDIA //; s/[^A-Za-z0-9]\+/-/g; s/-$//' | tr 'A-Z' 'a-z')
GPU=${GPU:-gpu}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
DAY=$(date -u +%Y%m%d)
mkdir -p "$OUT"
run() { echo "+ $*" >&2; "$@"; echo "exit status $?" >&2; }
for step in $STEPS; do
  case $step in
    seed64)
      run $STRATA bench throughput --model qwen3-4b --workload-file "$W/seed64.json" \
        --baseline transformers --baseline-timeout 240 ${ENGINE_ARGS:-} \
        --output-json "$OUT/$DAY-$GPU-seed64.json" ;;
    sharegpt1000)
      run $STRATA bench throughput --model qwen3-4b --workload-file "$W/sharegpt1000.json" \
        --baseline transformers --baseline-modes cb,static --baseline-timeout 240 ${ENGINE_ARGS:-} \
        --output-json "$OUT/$DAY-$GPU-sharegpt1000.json" ;;
    latency)
      run $STRATA bench latency --model qwen3-4b --input-len 1024 --output-len 128 --batch-sizes 1,8,64 \
        ${ENGINE_ARGS:-} --output-json "$OUT/$DAY-$GPU-latency.json" ;;
    tp2)
      [ "$NGPU" -ge 2 ] || { echo "tp2 needs 2 GPUs" >&2; continue; }
      run $STRATA bench latency --model llama-3-8b --batch-sizes 1 ${ENGINE_ARGS:-} \
        --output-json "$OUT/$DAY-$GPU-llama3-8b-tp1-latency.json"
      run $STRATA bench latency --model llama-3-8b --batch-sizes 1 --tensor-parallel-size 2 ${ENGINE_ARGS:-} \
        --output-json "$OUT/$DAY-$GPU-x2-llama3-8b-tp2-latency.json" ;;
    *) echo "unknown step $step" >&2 ;;
  esac
done
