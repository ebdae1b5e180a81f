#!/usr/bin/env bash
# One H200: what SHA-256 prefix-cache keys cost on sharegpt1000 (Qwen3-4B architecture, random bf16 weights),
# against the old Python hash() key patched in, alternating in one process. Carry .carry/tok and
# .carry/workloads; TREE_COMMIT=sha.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
timeout 500 python3 benchmarks/prefix_hash_cost.py --model qwen3-4b --tokenizer .carry/tok \
  --workload-file .carry/workloads/sharegpt1000.json --rounds 3 --out "$OUT/prefix_hash_cost.json" 2>&1 | grep -v "^\s*$" | tail -30
