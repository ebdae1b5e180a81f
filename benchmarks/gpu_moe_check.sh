#!/usr/bin/env bash
# One H200: Qwen3-30B-A3B (random weights) on the committed defaults (decode kernels, shipped tile table): batch
# 1-64 latency and 256 random requests of 512 in / 128 out. Carry .carry/tok; TREE_COMMIT=sha.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src STRATA_HANG_DUMP_S=120
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
M="--model qwen3-30b-a3b --load-format dummy --tokenizer .carry/tok --max-model-len 4096"
timeout 150 python3 -m strata.cli bench latency $M --input-len 1024 --output-len 64 --batch-sizes 1,16,64 \
  --num-iters 3 --num-iters-warmup 1 --output-json "$OUT/moe_latency_final.json" 2>&1 | tail -4
timeout 120 python3 -m strata.cli bench throughput $M --dataset random --num-prompts 256 \
  --input-len 512 --output-len 128 --output-json "$OUT/moe_throughput_final.json" 2>&1 | tail -3
