"""Overlapped (async) scheduling on one GPU: the same engine stepping synchronously and overlapped, alternately.

    python benchmarks/async_gpu.py --tokenizer .carry/tok --workloads .carry/workloads --out-json $OUT/async.json

One engine (reference model: Qwen3-4B architecture, dummy bf16 weights, `strata bench`'s engine defaults); for each
measurement it runs with `engine.async_scheduling` off, then on (the flag is read per step):
  parity      greedy tokens of 16 seed64 prompts x 64 tokens: async must equal sync (same batches, same kernels)
The prefix cache is emptied before every measurement, so that neither mode reuses the other's prompts.
  latency     batch 1, 8, 64 at 1024 prompt tokens, 128 output tokens (`strata bench latency`'s method)
  seed64      the 64 summaries, EOS ignored, wall time with the engine loaded
  sharegpt    sharegpt1000 output tokens/s, EOS ignored
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, ".carry", "tok"))
    ap.add_argument("--workloads", default=os.path.join(ROOT, ".carry", "workloads"))
    ap.add_argument("--out-json", default="async_gpu.json")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    ap.add_argument("--model", default="qwen3-4b", help="a `strata bench` architecture name")
    a = ap.parse_args()
    import torch

    from strata.bench.latency import run_latency
    from strata.bench.models import resolve
    from strata.core.sampling_params import SamplingParams
    from strata.engine.llm import LLM

    skip = set(a.skip.split(","))
    t = time.perf_counter()
    llm = LLM(resolve(a.model).path, load_format="dummy", tokenizer=a.tokenizer, max_model_len=4096)
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": a.model, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip() or "see carried snapshot",
           "command": " ".join(["python3"] + sys.argv), "load_s": round(time.perf_counter() - t, 1),
           "max_num_seqs": llm.engine.config.max_num_seqs,
           "max_num_batched_tokens": llm.engine.config.max_num_batched_tokens}
    eng = llm.engine
    wl = {n: json.load(open(os.path.join(a.workloads, f"{n}.json"))) for n in ("seed64", "sharegpt1000")}

    def log(*x):
        print(*x, file=sys.stderr, flush=True)

    def timed(records):
        eng.kv.reset_prefix_cache()  # every run computes its prompts: no hits from the other mode's run
        ps = [SamplingParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True) for r in records]
        t0 = time.perf_counter()
        res = llm.generate([r["prompt_ids"] for r in records], ps, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in res)
        return {"seconds": round(dt, 3), "output_tokens": n, "output_tok_s": round(n / dt, 1)}, res

    timed(wl["seed64"][:8])  # warm-up
    for mode in (False, True):
        eng.async_scheduling = mode
        name = "async" if mode else "sync"
        r = out.setdefault(name, {})
        if "parity" not in skip:
            recs = [{**x, "output_len": 64} for x in wl["seed64"][:16]]
            _, res = timed(recs)
            r["parity_tokens"] = [list(o.outputs[0].token_ids) for o in res]
        if "latency" not in skip:
            eng.kv.reset_prefix_cache()  # (its prompts repeat across modes; within a mode, per iteration seeds)
            r["latency"] = run_latency(llm, batch_sizes=[1, 8, 64], input_len=int(os.environ.get("AG_IN", 1024)), output_len=int(os.environ.get("AG_OUT", 128)), num_iters=2,
                                       num_warmup=1, log=log)
            for res_b in r["latency"]["results"].values():
                res_b.pop("iterations", None)
        if "seed64" not in skip:
            r["seed64"], _ = timed(wl["seed64"])
            log(name, "seed64", r["seed64"])
        if "sharegpt" not in skip:
            r["sharegpt1000"], _ = timed(wl["sharegpt1000"])
            log(name, "sharegpt1000", r["sharegpt1000"])
        with open(a.out_json, "w") as f:
            json.dump(out, f, indent=1)
    if "parity" not in skip:
        eq = [x == y for x, y in zip(out["sync"]["parity_tokens"], out["async"]["parity_tokens"])]
        out["parity"] = {"sequences_equal": sum(eq), "of": len(eq)}
        for m in ("sync", "async"):
            out[m].pop("parity_tokens")
    summary = {m: {"tpot_b1_ms": out[m].get("latency", {}).get("results", {}).get("1", {}).get("tpot_ms"),
                   "seed64_s": out[m].get("seed64", {}).get("seconds"),
                   "sharegpt_tok_s": out[m].get("sharegpt1000", {}).get("output_tok_s")} for m in ("sync", "async")}
    out["summary"] = summary
    with open(a.out_json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"summary": summary, "parity": out.get("parity")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
