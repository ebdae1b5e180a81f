#!/usr/bin/env bash
# One device call: parity smoke test, then the protocol's throughput / latency runs on the reference
# model (Qwen3-4B architecture, dummy bf16 weights) with the transformers baseline from the same run.
# Usage (device machine, repo root): bash benchmarks/gpu_engine_suite.sh $OUT   (carry .carry/tok and .carry/workloads)
# SKIP_SMOKE=1 leaves out the smoke test.
set -u
OUT=${1:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
COMMON="--model qwen3-4b --load-format dummy --tokenizer .carry/tok --max-model-len 4096"
[ -n "${SKIP_SMOKE:-}" ] || timeout 200 python3 benchmarks/gpu_smoke.py --out "$OUT" 2>&1 | grep -v "^\s*$" | tail -12
timeout 150 python3 -m strata.cli bench throughput $COMMON --dataset seed64 --workload-file .carry/workloads/seed64.json \
  --baseline transformers --baseline-timeout 60 --output-json "$OUT/seed64.json" 2>&1 | tail -14
timeout 200 python3 -m strata.cli bench throughput $COMMON --dataset sharegpt1000 --workload-file .carry/workloads/sharegpt1000.json \
  --baseline transformers --baseline-modes cb --baseline-timeout 90 --output-json "$OUT/sharegpt1000.json" 2>&1 | tail -14
timeout 120 python3 -m strata.cli bench latency $COMMON --input-len 1024 --output-len 128 --batch-sizes 1,8,64 \
  --output-json "$OUT/latency.json" 2>&1 | tail -8
