#!/usr/bin/env bash
# One H200: the MoE decode path (alignment-free matrix-vector kernels + the routing kernel) against the sorted
# grouped GEMM, kernel-level at Qwen3-30B-A3B shapes and end to end (batch-1 time per token of the model with
# random weights, batch 1 to 64, STRATA_MOE_DECODE=0 -- the previous path: sorted GEMM always, alignment and routing in torch
# ops -- against the default, same call). Carry .carry/tok and .carry/workloads; TREE_COMMIT=sha.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src STRATA_HANG_DUMP_S=120
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 benchmarks/moe_kernel.py --decode-ab --out "$OUT/moe_decode_ab.json" 2>&1 | tail -20
for d in 0 1; do
  STRATA_MOE_DECODE=$d timeout 200 python3 -m strata.cli bench latency --model qwen3-30b-a3b --load-format dummy \
    --tokenizer .carry/tok --max-model-len 4096 --input-len 1024 --output-len 64 --batch-sizes 1,4,16,64 \
    --num-iters 3 --num-iters-warmup 1 --output-json "$OUT/moe_latency_decode$d.json" 2>&1 | tail -6
done
# Diagnostic for the TP=2 batch-1 target (2 GPUs are not lent this session): Llama-3-8B on one GPU, whole, and cut to
# one TP=2 rank's widths (16 query / 4 KV heads, MLP 7168, vocab 64128: the GEMMs and kernels of one rank, no
# all-reduce), so that the rank's compute time can be set against the 3.61 ms measured for TP=2 on 2 x H200.
for ov in '{}' '{"num_attention_heads":16,"num_key_value_heads":4,"head_dim":128,"intermediate_size":7168,"vocab_size":64128}'; do
  timeout 150 python3 -m strata.cli bench latency --model llama-3-8b --load-format dummy --tokenizer .carry/tok \
    --max-model-len 4096 --input-len 1024 --output-len 128 --batch-sizes 1 --num-iters 5 --num-iters-warmup 1 \
    --hf-overrides "$ov" --output-json "$OUT/llama8b_rank$( [ "$ov" = '{}' ] && echo tp1 || echo tp2half ).json" 2>&1 | tail -3
done
