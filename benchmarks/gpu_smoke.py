"""GPU smoke test + first throughput figures (one call on the device machine).

1. Tiny random Llama: greedy tokens equal between CPU float32, CUDA float32 eager, CUDA float32 with
   CUDA graphs; bf16 graphs vs bf16 eager.
2. Reference model (Qwen3-4B architecture, dummy bf16 weights): sharegpt1000 and seed64 wall time and
   output tok/s, batch-1 decode time per token at 1k context.

    python benchmarks/gpu_smoke.py --tokenizer .carry/tok --workloads .carry/workloads --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
            "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645}


def log(*a):
    print(*a, flush=True)


def tiny_parity(tok_dir):
    from tests.tiny_models import write_tiny_model
    from strata import LLM, SamplingParams
    d = tempfile.mkdtemp()
    write_tiny_model("qwen3", d, seed=5)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), d)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 40, 17, 90, 3, 33, 64, 21)]
    p = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    res = {}
    for name, kw in [("cpu_fp32", dict(device="cpu", dtype="float32")),
                     ("cuda_fp32_eager", dict(device="cuda", dtype="float32", enforce_eager=True)),
                     ("cuda_fp32_graphs", dict(device="cuda", dtype="float32", max_num_seqs=16)),
                     ("cuda_bf16_eager", dict(device="cuda", dtype="bfloat16", enforce_eager=True)),
                     ("cuda_bf16_graphs", dict(device="cuda", dtype="bfloat16", max_num_seqs=16))]:
        llm = LLM(d, num_gpu_blocks_override=128, check_invariants=True, **kw)
        res[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
        del llm
    out = {k: sum(a == b for a, b in zip(v, res["cpu_fp32"])) for k, v in res.items()}
    out["bf16_graphs_vs_bf16_eager"] = sum(a == b for a, b in zip(res["cuda_bf16_graphs"], res["cuda_bf16_eager"]))
    log("tiny parity (sequences equal to cpu_fp32, of 8):", out)
    return out


def ref_model_dir(tok_dir):
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(QWEN3_4B, f)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), d)
    return d


def throughput(llm, reqs, label):
    from strata import SamplingParams
    ps = [SamplingParams(max_tokens=r["output_len"], temperature=0, ignore_eos=True) for r in reqs]
    llm.engine.runner.step_stats.clear()
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate([r["prompt_ids"] for r in reqs], ps, use_tqdm=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(r["prompt_ids"]) for r in reqs)
    r = {"workload": label, "seconds": round(dt, 3), "requests": len(reqs), "output_tokens": n_out,
         "output_tok_s": round(n_out / dt, 1), "total_tok_s": round((n_out + n_in) / dt, 1),
         "steps": {k: {"n": v[0], "s": round(v[1], 3), "tokens": v[2]} for k, v in llm.engine.runner.step_stats.items()}}
    log(r)
    return r


def latency(llm, ctx=1024, n_out=128):
    from strata import SamplingParams
    prompt = torch.randint(100, 30000, (ctx,)).tolist()
    p = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    p1 = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate([prompt], p1, use_tqdm=False)
    torch.cuda.synchronize(); ttft = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([prompt], p, use_tqdm=False)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    tpot = (dt - ttft) / (n_out - 1)
    r = {"batch": 1, "context": ctx, "output": n_out, "ttft_ms": round(ttft * 1e3, 2), "tpot_ms": round(tpot * 1e3, 3)}
    log(r)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".carry/tok")
    ap.add_argument("--workloads", default=".carry/workloads")
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = ap.parse_args()
    from strata import LLM
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "command": " ".join(sys.argv), "torch": torch.__version__}
    if not args.skip_tiny:
        res["tiny_parity"] = tiny_parity(args.tokenizer)
    d = ref_model_dir(args.tokenizer)
    t = time.perf_counter()
    llm = LLM(d, load_format="dummy", max_model_len=4096, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=0.9)
    res["load_s"] = round(time.perf_counter() - t, 1)
    res["num_kv_blocks"] = llm.engine.config.num_blocks
    log("engine up in", res["load_s"], "s; blocks", res["num_kv_blocks"])
    with open(os.path.join(args.workloads, "seed64.json")) as f:
        seed64 = json.load(f)
    with open(os.path.join(args.workloads, "sharegpt1000.json")) as f:
        sg = json.load(f)
    throughput(llm, seed64[:8], "warmup")
    res["seed64"] = throughput(llm, seed64, "seed64")
    res["sharegpt1000"] = throughput(llm, sg, "sharegpt1000")
    res["latency"] = latency(llm)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            throughput(llm, sg[:200], "sharegpt200-profiled")
        tbl = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        log(tbl)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write(tbl)
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    with open(os.path.join(args.out, "gpu_smoke.json"), "w") as f:
        json.dump(res, f, indent=1)
    log(json.dumps(res))


if __name__ == "__main__":
    main()
