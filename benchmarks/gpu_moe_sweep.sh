#!/usr/bin/env bash
# One H200: tiles of the MoE decode kernels (moe_kernel.py --decode-sweep), then the batch-1..64 latency of
# Qwen3-30B-A3B (random weights) with the default tiles. Carry .carry/tok; TREE_COMMIT=sha.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src STRATA_HANG_DUMP_S=120
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 330 python3 benchmarks/moe_kernel.py --decode-sweep --out "$OUT/moe_decode_sweep.json" 2>&1 | tail -14
timeout 200 python3 -m strata.cli bench latency --model qwen3-30b-a3b --load-format dummy \
  --tokenizer .carry/tok --max-model-len 4096 --input-len 1024 --output-len 64 --batch-sizes 1,4,16,64 \
  --num-iters 3 --num-iters-warmup 1 --output-json "$OUT/moe_latency_3d.json" 2>&1 | tail -6
