#!/usr/bin/env bash
# Four-GPU runs (issue 8) on nvidia-h200-x4, as three device calls of under 10 minutes each. Carry .carry/tok,
# .carry/workloads and .carry/batch (rebuild commands: the header of benchmarks/gpu_pending.sh); write under $OUT.
#
#   PART=a bash benchmarks/gpu_x4.sh   # Llama-3-70B TP=4 and TP=2 x PP=2; greedy parity of the layouts
#   PART=b bash benchmarks/gpu_x4.sh   # Qwen3-30B-A3B: one GPU, TP=2, TP=2+EP, TP=4, TP=4+EP
#   PART=c bash benchmarks/gpu_x4.sh   # reference model DP=4: sharegpt1000 and strata batch on 10,000 posts
#   PART=d bash benchmarks/gpu_x4.sh   # pipeline stages as CUDA graphs (STRATA_PP_GRAPHS=1): 70B TP=2 x PP=2
#                                      # (on nvidia-h200-x2 the same command measures Llama-3-8B PP=2)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src STRATA_HANG_DUMP_S=120 TREE_COMMIT=${TREE_COMMIT:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
P="python3 benchmarks/parallel_gpu4.py --out $OUT --workloads .carry/workloads --async-steps"
F='^\[transformers\]\|^\[rank'
case "${PART:-a}" in
a)
  nvidia-smi topo -m > "$OUT/topo.txt" 2>&1; head -8 "$OUT/topo.txt"
  timeout 400 $P --out $OUT/a1 --cases big70b4 2>&1 | grep -v "$F"
  timeout 170 $P --out $OUT/a2 --cases parity4 2>&1 | grep -v "$F" | grep -- "->\|done\|rror\|wrote" ;;
b)
  timeout 560 $P --cases moe4 2>&1 | grep -v "$F" ;;
c)
  timeout 200 $P --out $OUT/c1 --cases dp4 2>&1 | grep -v "$F"
  timeout 330 python3 benchmarks/batch_throughput.py dp --posts .carry/batch/sharegpt10k.jsonl --dp 4 --model qwen3-4b \
    --tokenizer .carry/tok --out-json "$OUT/batch-dp4.json" 2>&1 | grep -E "dp=|data parallel|rror" | head -20 ;;
d)
  timeout 560 $P --cases ppgraphs 2>&1 | grep -v "$F" | grep -- "->\|done\|rror\|parity\|wrote" ;;
esac
