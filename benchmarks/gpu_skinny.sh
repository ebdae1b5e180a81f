#!/usr/bin/env bash
# One H200 call: the skinny GEMM (STRATA_SKINNY_GEMM=1) against cuBLAS for decode-step linears, and cuBLAS
# against cuBLASLt. Carry .carry/tok and .carry/workloads; writes under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
P="python3 benchmarks/profile_gpu.py --skip sharegpt,seed64,mixed"
timeout 100 $P --out "$OUT/default" 2>&1 | grep "^b1"
STRATA_SKINNY_GEMM=1 timeout 150 python3 benchmarks/profile_gpu.py --skip seed64,mixed \
  --out "$OUT/skinny" 2>&1 | grep "^b1\|^sharegpt" | cut -c1-400
timeout 100 $P --blas cublas --out "$OUT/cublas" 2>&1 | grep "^b1"
STRATA_SKINNY_GEMM=1 timeout 100 python3 -m strata.cli bench latency --model qwen3-4b --load-format dummy \
  --tokenizer .carry/tok --max-model-len 4096 --input-len 1024 --output-len 128 --batch-sizes 1,8 \
  --output-json "$OUT/latency-skinny.json" 2>&1 | tail -3
timeout 150 python3 benchmarks/parallel_gpu.py --out "$OUT/parity" --cases parity --parity-dtypes bfloat16 \
  --parity-layouts skinny --workloads .carry/workloads 2>&1 | grep "done"
python3 -c "
import json; d=json.load(open('$OUT/parity/parallel_gpu-parity.json'))
print(json.dumps(d['results'])[:1500])"
python3 -c "
import json
for n in ('default','skinny','cublas'):
    d=json.load(open('$OUT/'+n+'/profile.json')); print(n, d.get('blas'), d.get('skinny_gemm'), d.get('profile_b1',{}).get('unprofiled_tpot_ms'), d.get('skinny_gemm_choices'))"
