"""What the SHA-256 prefix-cache keys cost (issue 18, item 4): sharegpt1000 through one engine, alternating the
shipped key (`hash_block`: chained SHA-256) with the old one (Python `hash()` of (parent, token tuple)), which
is patched in for the baseline runs only. The prefix cache is emptied before each run, so every run hashes
and looks up the same blocks. Also times the hashing alone over every full block of the workload on the CPU.

    python benchmarks/prefix_hash_cost.py --model qwen3-4b --tokenizer .carry/tok \
        --workload-file .carry/workloads/sharegpt1000.json --out result.json

On the CPU (a quick check): add `--model-args '{"device": "cpu"}' --num-prompts 16` with a small model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from strata.kvcache import manager  # noqa: E402

SHA256 = manager.hash_block


def python_hash(parent, tokens, extra=b""):
    """The key strata used before: 64 bits, collides (hash(n) == hash(n + 2**61 - 1))."""
    return hash((parent, tuple(tokens), extra))


def hash_only(records, block_size: int, fn, repeats: int = 3) -> float:
    """Seconds to key every full block of every request's prompt + output (best of `repeats`)."""
    seqs = [r["prompt_ids"] + [1] * int(r["output_len"]) for r in records]
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for s in seqs:
            parent = None
            for i in range(len(s) // block_size):
                parent = fn(parent, s[i * block_size:(i + 1) * block_size])
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-4b")
    ap.add_argument("--tokenizer", default=".carry/tok")
    ap.add_argument("--workload-file", default=".carry/workloads/sharegpt1000.json")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of (sha256, python hash) runs, alternating")
    ap.add_argument("--model-args", default="{}", help="JSON of extra LLM(...) keyword arguments")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from strata.bench.engine_run import build_llm, run_strata, warmup
    from strata.bench.models import resolve
    from strata.config.engine import EngineArgs

    with open(args.workload_file) as f:
        data = json.load(f)
    records = data["requests"] if isinstance(data, dict) else data
    records = records[: args.num_prompts] if args.num_prompts else records
    rm = resolve(args.model)
    ea = EngineArgs(model=rm.path, tokenizer=args.tokenizer, load_format="dummy" if rm.kind != "hf" else "auto",
                    max_model_len=4096, **json.loads(args.model_args))
    llm, load_s = build_llm(ea)
    bs = llm.engine.config.block_size
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
           "tree_commit": os.environ.get("TREE_COMMIT") or subprocess.run(
               ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "torch": torch.__version__, "model": args.model, "num_requests": len(records), "load_s": load_s,
           "block_size": bs, "runs": []}
    res["hash_only_s"] = {"sha256": hash_only(records, bs, SHA256), "python_hash": hash_only(records, bs, python_hash)}
    warmup(llm, records)
    for rnd in range(args.rounds):
        for name, fn in (("sha256", SHA256), ("python_hash", python_hash)):
            manager.hash_block = fn
            try:
                llm.engine.kv.reset_prefix_cache()
                r = run_strata(llm, records)
            finally:
                manager.hash_block = SHA256
            row = {"key": name, "round": rnd, "wall_s": round(r["wall_s"], 3), "output_tok_s": round(r["output_tok_s"], 1),
                   "output_lengths_exact": r["output_lengths_exact"], "prefix_cache_hit_tokens": r["prefix_cache_hit_tokens"]}
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
    for name in ("sha256", "python_hash"):
        walls = [r["wall_s"] for r in res["runs"] if r["key"] == name]
        res[f"{name}_best_wall_s"] = min(walls)
    res["sha256_cost_pct"] = round(100 * (res["sha256_best_wall_s"] / res["python_hash_best_wall_s"] - 1), 2)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
