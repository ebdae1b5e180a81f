"""Where the time goes on one GPU: Triton compilations during serving, per-step-kind time, and torch.profiler
tables for batch-1 decode and for prefill-heavy mixed steps.

    python benchmarks/profile_gpu.py --out $OUT [--tokenizer .carry/tok] [--workloads .carry/workloads]

One engine (reference model: Qwen3-4B architecture, dummy bf16 weights, `LLM` defaults, max_model_len 4096).
  sharegpt-cold   sharegpt1000 right after start-up: output tok/s, the engine's time per step kind, and how many
                  Triton kernel variants compiled inside the timed run (each stalls its step)
  sharegpt-warm   the same workload again (prefix cache emptied first): what a long-running server sees
  seed64          wall time with the engine loaded (prefix cache emptied first)
  profile-b1      torch.profiler over 48 batch-1 decode steps at 1024 context: GPU busy time per step against
                  wall time per step (the rest is host time the GPU waits for), top kernels
  profile-mixed   torch.profiler over 120 sharegpt requests from a cold cache: top ops by GPU and by CPU time
Writes profile.json and the profiler tables (profile-*.txt) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def log(*x):
    print(*x, file=sys.stderr, flush=True)


def busy_us(prof) -> tuple[float, int]:
    """Union of the device-side intervals (kernels, copies) in a profile, and how many there were."""
    from torch.autograd import DeviceType

    iv = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                if getattr(e, "device_type", None) == DeviceType.CUDA)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total, len(iv)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, ".carry", "tok"))
    ap.add_argument("--workloads", default=os.path.join(ROOT, ".carry", "workloads"))
    ap.add_argument("--out", default=".")
    ap.add_argument("--model", default="qwen3-4b")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], help="torch.backends.cuda.preferred_blas_library")
    ap.add_argument("--async-scheduling", action="store_true", help="overlapped steps for every part")
    ap.add_argument("--mixed-requests", type=int, default=120)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="TP engine: the profile is the driver's (TP rank 0), the others do the same work")
    ap.add_argument("--enable-expert-parallel", action="store_true")
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from strata.bench.models import resolve
    from strata.core.sampling_params import SamplingParams
    from strata.engine.llm import LLM
    from strata.ops.triton_kernels._utils import compiled_variants

    skip = set(a.skip.split(","))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    os.makedirs(a.out, exist_ok=True)
    if a.blas:
        torch.backends.cuda.preferred_blas_library(a.blas)
    t = time.perf_counter()
    llm = LLM(resolve(a.model).path, load_format="dummy", tokenizer=a.tokenizer, max_model_len=a.max_model_len,
              tensor_parallel_size=a.tensor_parallel_size, enable_expert_parallel=a.enable_expert_parallel,
              async_scheduling=a.async_scheduling)
    eng = llm.engine
    runner = eng.runner
    if not hasattr(runner, "step_stats"):  # the multiprocess executor keeps no per-kind step times
        runner.step_stats = {}
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": a.model, "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip() or "see carried snapshot",
           "command": " ".join(["python3"] + sys.argv), "load_s": round(time.perf_counter() - t, 1),
           "tensor_parallel_size": a.tensor_parallel_size, "enable_expert_parallel": a.enable_expert_parallel,
           "async_scheduling": bool(getattr(eng, "async_scheduling", False)),
           "blas": str(torch.backends.cuda.preferred_blas_library()) if torch.cuda.is_available() else None,
           "compiled_after_load": compiled_variants()}
    wl = {n: json.load(open(os.path.join(a.workloads, f"{n}.json"))) for n in ("seed64", "sharegpt1000")}

    def save():
        with open(os.path.join(a.out, "profile.json"), "w") as f:
            json.dump(out, f, indent=1)

    def timed(records, label):
        eng.kv.reset_prefix_cache()
        ps = [SamplingParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True) for r in records]
        runner.step_stats.clear()
        before = compiled_variants()
        sync()
        t0 = time.perf_counter()
        res = llm.generate([r["prompt_ids"] for r in records], ps, use_tqdm=False)
        sync()
        dt = time.perf_counter() - t0
        after = compiled_variants()
        n = sum(len(o.outputs[0].token_ids) for o in res)
        r = {"seconds": round(dt, 3), "output_tokens": n, "output_tok_s": round(n / dt, 1),
             "compiled_during_run": {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)},
             "steps": {k: {"n": v[0], "seconds": round(v[1], 3), "tokens": v[2],
                           "ms_per_step": round(1e3 * v[1] / max(v[0], 1), 2)}
                       for k, v in runner.step_stats.items()}}
        log(label, json.dumps(r))
        out[label] = r
        save()
        return r

    if "sharegpt" not in skip:
        timed(wl["sharegpt1000"], "sharegpt_cold")
        timed(wl["sharegpt1000"], "sharegpt_warm")
    if "seed64" not in skip:
        timed(wl["seed64"], "seed64")

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def tables(prof, name, n=30):
        ka = prof.key_averages()
        with open(os.path.join(a.out, f"profile-{name}.txt"), "w") as f:
            f.write(ka.table(sort_by="self_cuda_time_total", row_limit=n))
            f.write("\n\n")
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=n))
        top = sorted(ka, key=lambda e: -e.self_device_time_total)[:12]
        return [{"name": e.key[:90], "calls": e.count, "gpu_ms": round(e.self_device_time_total / 1e3, 3),
                 "cpu_ms": round(e.self_cpu_time_total / 1e3, 3)} for e in top]

    if "b1" not in skip:
        prompt = torch.randint(100, 30000, (1024,), generator=torch.Generator().manual_seed(7)).tolist()
        steps = 48
        p = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
        llm.generate([prompt], p, use_tqdm=False)  # warm (and cache the prompt: the profile is decode only)
        eng.kv.reset_prefix_cache()
        # unprofiled timing of the same request
        sync()
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False)
        ttft = time.perf_counter() - t0
        eng.kv.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate([prompt], p, use_tqdm=False)
        sync()
        tpot = (time.perf_counter() - t0 - ttft) / steps
        # the prompt stays cached: the profiled request computes one prompt token, then decodes
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            llm.generate([prompt], p, use_tqdm=False)
            sync()
            wall = time.perf_counter() - t0
        busy, nev = busy_us(prof)
        out["profile_b1"] = {"unprofiled_tpot_ms": round(tpot * 1e3, 3), "unprofiled_ttft_ms": round(ttft * 1e3, 2),
                             "profiled_wall_ms": round(wall * 1e3, 1), "decode_steps": steps,
                             "gpu_busy_ms_total": round(busy / 1e3, 2), "device_events": nev,
                             "note": "prompt cached: one prompt token computed, then decode steps",
                             "top": tables(prof, "b1")}
        log("b1", json.dumps({k: v for k, v in out["profile_b1"].items() if k != "top"}))
        save()
    if "mixed" not in skip:
        recs = wl["sharegpt1000"][:a.mixed_requests]
        ps = [SamplingParams(max_tokens=min(r["output_len"], 32), temperature=0.0, ignore_eos=True) for r in recs]
        eng.kv.reset_prefix_cache()
        runner.step_stats.clear()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            llm.generate([r["prompt_ids"] for r in recs], ps, use_tqdm=False)
            sync()
            wall = time.perf_counter() - t0
        busy, nev = busy_us(prof)
        out["profile_mixed"] = {"requests": len(recs), "profiled_wall_ms": round(wall * 1e3, 1),
                                "gpu_busy_ms": round(busy / 1e3, 2), "device_events": nev,
                                "steps": {k: {"n": v[0], "seconds": round(v[1], 3), "tokens": v[2]}
                                          for k, v in runner.step_stats.items()},
                                "top": tables(prof, "mixed")}
        log("mixed", json.dumps({k: v for k, v in out["profile_mixed"].items() if k != "top"}))
        save()
    out["compiled_at_end"] = compiled_variants()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
