#!/usr/bin/env bash
# One H200: tune the sorted fused-MoE GEMM's tiles for Qwen3-30B-A3B's experts (moe_kernel.py --tune, table written
# under $OUT/cfg), then Qwen3-30B-A3B (random weights) with that table against the heuristic tiles, same call:
# batch 16 / 64 latency and 256 random requests of 512 in / 128 out. Carry .carry/tok; TREE_COMMIT=sha.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/cfg" /tmp/no-moe-configs
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src STRATA_HANG_DUMP_S=120
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 280 python3 benchmarks/moe_kernel.py --tune "$OUT/cfg" --out "$OUT/moe_tune.json" 2>&1 | tail -8
M="--model qwen3-30b-a3b --load-format dummy --tokenizer .carry/tok --max-model-len 4096"
for d in /tmp/no-moe-configs "$OUT/cfg"; do
  tag=$( [ "$d" = "$OUT/cfg" ] && echo tuned || echo heuristic ); echo "== $tag"
  STRATA_MOE_CONFIG_DIR=$d timeout 150 python3 -m strata.cli bench throughput $M --dataset random --num-prompts 256 \
    --input-len 512 --output-len 128 --output-json "$OUT/moe_throughput_$tag.json" 2>&1 | tail -3
done
