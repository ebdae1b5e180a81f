#!/usr/bin/env bash
# One H200, Qwen3-30B-A3B (random bf16 weights): the MoE path before this work (STRATA_MOE_DECODE=0: sorted grouped
# GEMM always, alignment and routing in torch ops) against the default (decode kernels with swept tiles, one-kernel
# routing, two-kernel alignment), same call: batch 1-64 latency (1024-token prompts, 64 out) and throughput over
# 256 random requests of 512 in / 128 out. Carry .carry/tok; TREE_COMMIT=sha.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src STRATA_HANG_DUMP_S=120
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
M="--model qwen3-30b-a3b --load-format dummy --tokenizer .carry/tok --max-model-len 4096"
for d in 0 1; do
  echo "== STRATA_MOE_DECODE=$d"
  STRATA_MOE_DECODE=$d timeout 200 python3 -m strata.cli bench latency $M --input-len 1024 --output-len 64 \
    --batch-sizes 1,4,16,64 --num-iters 3 --num-iters-warmup 1 --output-json "$OUT/moe_latency_decode$d.json" 2>&1 | tail -5
  STRATA_MOE_DECODE=$d timeout 200 python3 -m strata.cli bench throughput $M --dataset random --num-prompts 256 \
    --input-len 512 --output-len 128 --output-json "$OUT/moe_throughput_decode$d.json" 2>&1 | tail -4
done
