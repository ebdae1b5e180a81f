"""Two (or more) source trees in one call, alternately: seed64 wall time, sharegpt1000 output tok/s and batch-1
time per output token, best of N rounds per tree, with the spread (issue 19's same-call regression check).

    python benchmarks/ab_trees.py --tree old=.carry/trees/old/src --tree new=src --out $OUT/regress.json
    python benchmarks/ab_trees.py --smoke --tree old=/tmp/tree-old/src --tree new=src --out /tmp/regress.json

Each (round, tree) is one fresh process of this file (`--worker`) with PYTHONPATH set to that tree's `src`, so
that nothing of one tree is imported by the other; the order is A B A B ... (round r runs every tree in the
order given). A worker loads one engine (reference model: Qwen3-4B architecture, random bf16 weights,
`strata bench`'s flags plus --max-model-len 4096), warms it up, then, with the prefix cache emptied before each
timed run: seed64 (engine loaded, EOS ignored) `--seed64-repeats` times, sharegpt1000 `--sharegpt-repeats` times,
and `strata bench latency`'s batch-1 measurement (1024-token prompt, 128 output tokens, median of
`--latency-iters`). The engine is built through each tree's own `strata bench` parser and
`strata.bench.engine_run`, so the flags mean in each tree what `strata bench` means there.

Per tree and metric the record keeps every value, the best (lowest wall / time per token, highest tok/s), the
median and the spread ((max - min) / best); per metric it compares every tree's best with the first tree's:
`slower_pct` > 0 means slower than the first tree, `within` says whether |slower_pct| <= --tolerance-pct (3)
on the slower side. The JSON is rewritten after every worker, so a call cut short keeps what it measured;
--budget-s stops starting rounds that would not finish inside the call.

`--smoke` is the same path on the CPU in seconds: SmolLM2-135M's architecture cut to 2 layers with random
float32 weights, 4 requests of each workload with 8 output tokens, batch-1 latency at 64 prompt tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# No sys.path insertion of this repository's src here: a worker must import strata from its tree only.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRICS = {  # name -> (worker key, "min" if lower is better else "max", unit)
    "seed64_wall_s": ("seed64", "min", "s"),
    "sharegpt1000_output_tok_s": ("sharegpt1000", "max", "tok/s"),
    "b1_tpot_ms": ("latency", "min", "ms"),
}

GPU_ENGINE_ARGS = ["--model", "qwen3-4b", "--load-format", "dummy", "--max-model-len", "4096"]
SMOKE_ENGINE_ARGS = ["--model", "smollm2-135m", "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
                     "--max-model-len", "1024", "--hf-overrides", '{"num_hidden_layers": 2}',
                     "--kv-cache-memory", str(64 << 20), "--num-threads", "1"]


# ---------------------------------------------------------------------------------------------- worker
def _reset_prefix_cache(llm) -> str:
    """Empty the prefix cache through whatever this tree offers; returns what was called."""
    eng = getattr(llm, "engine", None)
    for owner, name in ((llm, "llm"), (eng, "engine"), (getattr(eng, "kv", None), "engine.kv"),
                        (getattr(getattr(eng, "scheduler", None), "kv", None), "engine.scheduler.kv")):
        fn = getattr(owner, "reset_prefix_cache", None)
        if callable(fn):
            fn()
            return name + ".reset_prefix_cache"
    return "none"


def _timed_run(llm, records, name: str) -> dict:
    from strata.bench.engine_run import run_strata
    how = _reset_prefix_cache(llm)
    r = run_strata(llm, records)
    print(f"{name}: {r['wall_s']:.3f} s, {r['output_tok_s']:.1f} output tok/s, exact={r['output_lengths_exact']}",
          file=sys.stderr, flush=True)
    keep = ("wall_s", "output_tok_s", "num_requests", "output_tokens", "output_lengths_exact", "preemptions",
            "prefix_cache_hit_tokens")
    return {**{k: r.get(k) for k in keep}, "prefix_cache_reset": how}


def worker(spec: dict) -> int:
    t_start = time.perf_counter()
    import strata
    here = os.path.realpath(os.path.dirname(strata.__file__))
    want = os.path.realpath(os.path.join(spec["src"], "strata"))
    if here != want:
        print(f"error: strata imported from {here}, expected {want} (PYTHONPATH={os.environ.get('PYTHONPATH')})",
              file=sys.stderr)
        return 3
    import argparse as _ap
    from strata import bench_cli
    from strata.bench.engine_run import build_llm, close_llm, engine_args_for, warmup
    from strata.bench.latency import run_latency
    parser = _ap.ArgumentParser()
    bench_cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", "latency", *spec["engine_args"]])
    ea, rm, notes = engine_args_for(args)
    llm, load_s = build_llm(ea)
    print(f"{spec['name']} round {spec['round']}: strata from {strata.__file__}, engine loaded in {load_s:.1f} s",
          file=sys.stderr, flush=True)
    res: dict = {"tree": spec["name"], "round": spec["round"], "strata_file": strata.__file__, "load_s": load_s,
                 "notes": notes, "device": str(llm.engine.config.device), "pid": os.getpid()}
    try:
        with open(spec["workloads_file"]) as f:
            wl = json.load(f)
        res["warmup_s"] = warmup(llm, wl["sharegpt1000"], n=8)
        for name, reps in (("seed64", spec["seed64_repeats"]), ("sharegpt1000", spec["sharegpt_repeats"])):
            res[name] = [_timed_run(llm, wl[name], name) for _ in range(reps)]
        lat = spec["latency"]
        _reset_prefix_cache(llm)
        out = run_latency(llm, batch_sizes=[1], input_len=lat["input_len"], output_len=lat["output_len"],
                          num_iters=lat["iters"], num_warmup=1, log=lambda s: print(s, file=sys.stderr))
        r1 = out["results"]["1"]
        res["latency"] = {"input_len": lat["input_len"], "output_len": lat["output_len"],
                          **{k: r1.get(k) for k in ("tpot_ms", "ttft_ms_mean", "decode_step_ms", "e2e_s")},
                          "tpot_ms_iterations": [it.get("tpot_ms") for it in r1.get("iterations", [])]}
    finally:
        close_llm(llm)
    res["worker_s"] = time.perf_counter() - t_start
    with open(spec["result"], "w") as f:
        json.dump(res, f, indent=1)
    return 0


# ---------------------------------------------------------------------------------------------- orchestrator
def _load_records(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    recs = data["requests"] if isinstance(data, dict) else data
    return [{"prompt_ids": list(r["prompt_ids"]), "output_len": int(r["output_len"])} for r in recs]


def _random_records(n: int, input_len: int, output_len: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_ids": [rng.randrange(100, vocab) for _ in range(input_len)], "output_len": output_len}
            for _ in range(n)]


def find_workloads(given: str | None) -> str | None:
    for d in ([given] if given else []) + [os.path.join(ROOT, ".carry", "workloads"),
                                             os.path.join(ROOT, "..", "shared", "workloads")]:
        if d and os.path.isfile(os.path.join(d, "seed64.json")) and os.path.isfile(os.path.join(d, "sharegpt1000.json")):
            return d
    return None


def find_tokenizer(given: str | None, smoke: bool) -> str | None:
    """The tokenizer directory; None in a smoke run without one (the engine then uses the embedded SmolLM2's)."""
    for d in ([given] if given else []) + [os.path.join(ROOT, ".carry", "tok")]:
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    if given or not smoke:
        raise SystemExit(f"error: no tokenizer directory (--tokenizer {given or '.carry/tok'}); rebuild it with "
                         "`python benchmarks/run.py carry`")
    return None


def tree_commit(name: str, src: str) -> str | None:
    """The tree's commit: `<tree>/COMMIT` (written by `run.py make-tree`), TREE_COMMIT_<NAME>, else git."""
    top = os.path.dirname(os.path.abspath(src))
    p = os.path.join(top, "COMMIT")
    if os.path.isfile(p):
        return open(p).read().strip()
    env = os.environ.get(f"TREE_COMMIT_{name.upper()}") or (
        os.environ.get("TREE_COMMIT") if os.path.abspath(top) == ROOT else None)
    if env:
        return env
    try:
        out = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return platform.processor() or platform.machine() or "cpu"


def _value(run: dict, metric: str) -> list[float]:
    key = METRICS[metric][0]
    if key == "latency":
        v = (run.get("latency") or {}).get("tpot_ms")
        return [v] if v is not None else []
    field = "wall_s" if metric.endswith("wall_s") else "output_tok_s"
    return [r[field] for r in run.get(key) or [] if r.get(field) is not None]


def summarise(runs: list[dict], trees: list[str], tolerance_pct: float) -> dict:
    out: dict = {"per_tree": {}, "compare": {}, "tolerance_pct": tolerance_pct}
    for t in trees:
        mine = [r for r in runs if r.get("tree") == t and r.get("ok")]
        per = {}
        for m, (_, better, unit) in METRICS.items():
            xs = [v for r in mine for v in _value(r, m)]
            if not xs:
                continue
            best = min(xs) if better == "min" else max(xs)
            per[m] = {"best": best, "median": statistics.median(xs), "spread_pct": 100 * (max(xs) - min(xs)) / best,
                      "n": len(xs), "values": xs, "unit": unit}
        out["per_tree"][t] = per
    base = trees[0]
    for t in trees[1:]:
        cmp_ = {}
        for m, (_, better, _unit) in METRICS.items():
            a, b = out["per_tree"].get(base, {}).get(m), out["per_tree"].get(t, {}).get(m)
            if not a or not b:
                continue
            ratio = b["best"] / a["best"]
            slower = 100 * (ratio - 1) if better == "min" else 100 * (1 / ratio - 1)
            cmp_[m] = {base: a["best"], t: b["best"], "ratio": ratio, "slower_pct": slower,
                       "within": slower <= tolerance_pct}
        cmp_["all_within"] = bool(cmp_) and all(v["within"] for v in cmp_.values() if isinstance(v, dict)) \
            and len(cmp_) == len(METRICS)
        out["compare"][f"{t}_vs_{base}"] = cmp_
    return out


def table(summary: dict, trees: list[str]) -> str:
    lines = []
    head = f"{'metric':28}" + "".join(f"{t + ' best (spread)':>26}" for t in trees)
    lines.append(head)
    for m, (_, _b, unit) in METRICS.items():
        row = f"{m:28}"
        for t in trees:
            v = summary["per_tree"].get(t, {}).get(m)
            row += f"{('%.4g %s (%.1f%%, n=%d)' % (v['best'], unit, v['spread_pct'], v['n'])) if v else '-':>26}"
        lines.append(row)
    for k, c in summary["compare"].items():
        parts = [f"{m} {c[m]['slower_pct']:+.2f}%" for m in METRICS if m in c]
        lines.append(f"{k}: " + ", ".join(parts) + f"  -> {'within' if c.get('all_within') else 'NOT within'} "
                     f"{summary['tolerance_pct']}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=SRC",
                    help="a source tree's src directory (repeat; the first is the baseline)")
    ap.add_argument("--out", default="regress.json", help="the JSON record (the workers' output goes beside it, -workers.log)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration (seconds)")
    ap.add_argument("--workloads", default=None, help="directory with seed64.json and sharegpt1000.json "
                                                      "(default .carry/workloads, then ../shared/workloads)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default .carry/tok)")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra `strata bench` engine flag (repeat; "
                                                                      "--engine-arg=--enforce-eager)")
    ap.add_argument("--num-prompts", type=int, default=None, help="first N requests of each workload")
    ap.add_argument("--output-len", type=int, default=None, help="override every request's output length")
    ap.add_argument("--seed64-repeats", type=int, default=2)
    ap.add_argument("--sharegpt-repeats", type=int, default=1)
    ap.add_argument("--latency-iters", type=int, default=5)
    ap.add_argument("--latency-input-len", type=int, default=None)
    ap.add_argument("--latency-output-len", type=int, default=None)
    ap.add_argument("--tolerance-pct", type=float, default=3.0)
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no round that would end after this")
    ap.add_argument("--worker-timeout-s", type=float, default=240.0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            return worker(json.load(f))

    t0 = time.perf_counter()
    trees: list[tuple[str, str]] = []
    for spec in args.tree or []:
        name, _, src = spec.partition("=")
        if not name or not src:
            ap.error(f"--tree {spec!r}: want NAME=SRC")
        src = os.path.abspath(src)
        if not os.path.isfile(os.path.join(src, "strata", "__init__.py")):
            ap.error(f"--tree {spec!r}: {src}/strata/__init__.py does not exist")
        trees.append((name, src))
    if len(trees) < 2:
        ap.error("give at least two --tree NAME=SRC")
    if len({n for n, _ in trees}) != len(trees):
        ap.error("tree names must differ")

    n = args.num_prompts or (4 if args.smoke else None)
    olen = args.output_len or (8 if args.smoke else None)
    wdir = find_workloads(args.workloads)
    wl: dict[str, list[dict]] = {}
    for name in ("seed64", "sharegpt1000"):
        if wdir:
            recs = _load_records(os.path.join(wdir, name + ".json"))
        elif args.smoke:
            recs = _random_records(n, 48 if name == "seed64" else 32, olen, 49152, seed=len(name))
        else:
            ap.error("no workload files: --workloads DIR (seed64.json, sharegpt1000.json)")
        recs = recs[:n] if n else recs
        if olen:
            recs = [{**r, "output_len": olen} for r in recs]
        if args.smoke:
            recs = [{**r, "prompt_ids": r["prompt_ids"][:96]} for r in recs]
        wl[name] = recs
    tok = find_tokenizer(args.tokenizer, args.smoke)
    engine_args = ((SMOKE_ENGINE_ARGS if args.smoke else GPU_ENGINE_ARGS) + (["--tokenizer", tok] if tok else [])
                   + args.engine_arg)
    lat = {"input_len": args.latency_input_len or (64 if args.smoke else 1024),
           "output_len": args.latency_output_len or (8 if args.smoke else 128),
           "iters": args.latency_iters if not args.smoke or args.latency_iters != 5 else 2}

    out_path = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    log_path = os.path.splitext(out_path)[0] + "-workers.log"
    work = tempfile.mkdtemp(prefix="strata-ab-")
    wl_path = os.path.join(work, "workloads.json")
    with open(wl_path, "w") as f:
        json.dump(wl, f)
    record = {
        "benchmark": "ab_trees", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
        "device": device_name(), "python": platform.python_version(), "smoke": args.smoke,
        "trees": {name: {"src": src, "commit": tree_commit(name, src)} for name, src in trees},
        "baseline_tree": trees[0][0], "engine_args": engine_args, "rounds": args.rounds,
        "order": "A B A B ...: every round runs the trees in the order given, one fresh process each",
        "workloads": {k: {"num_requests": len(v), "prompt_tokens": sum(len(r["prompt_ids"]) for r in v),
                          "output_tokens": sum(r["output_len"] for r in v), "dir": wdir} for k, v in wl.items()},
        "seed64_repeats": args.seed64_repeats, "sharegpt_repeats": args.sharegpt_repeats, "latency": lat,
        "runs": [],
    }
    try:
        import torch
        record["torch"] = torch.__version__
    except ImportError:
        pass

    def save():
        record["summary"] = summarise(record["runs"], [t for t, _ in trees], args.tolerance_pct)
        record["elapsed_s"] = time.perf_counter() - t0
        with open(out_path, "w") as f:
            json.dump(record, f, indent=1)

    round_s: list[float] = []
    with open(log_path, "w") as log:
        for rnd in range(args.rounds):
            elapsed = time.perf_counter() - t0
            if round_s and elapsed + max(round_s) > args.budget_s:
                msg = f"round {rnd}: skipped, {elapsed:.0f} s gone and a round takes up to {max(round_s):.0f} s " \
                      f"(--budget-s {args.budget_s:.0f})"
                print(msg, flush=True)
                record.setdefault("skipped", []).append(msg)
                break
            t_round = time.perf_counter()
            for name, src in trees:
                spec = {"name": name, "src": src, "round": rnd, "engine_args": engine_args,
                        "seed64_repeats": args.seed64_repeats, "sharegpt_repeats": args.sharegpt_repeats,
                        "latency": lat, "workloads_file": wl_path,
                        "result": os.path.join(work, f"{rnd}-{name}.json")}
                spec_path = os.path.join(work, f"{rnd}-{name}-spec.json")
                with open(spec_path, "w") as f:
                    json.dump(spec, f)
                env = {**os.environ, "PYTHONPATH": src, "PYTHONUNBUFFERED": "1"}
                log.write(f"\n===== round {rnd} tree {name} ({src})\n")
                log.flush()
                tw = time.perf_counter()
                try:
                    rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                                        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=args.worker_timeout_s).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                run = {"tree": name, "round": rnd, "rc": rc, "ok": False, "process_s": time.perf_counter() - tw}
                if rc == 0 and os.path.isfile(spec["result"]):
                    with open(spec["result"]) as f:
                        run.update(json.load(f))
                    run["ok"] = True
                record["runs"].append(run)
                save()
                figs = ", ".join(f"{m} {'/'.join('%.4g' % v for v in _value(run, m))}" for m in METRICS)
                print(f"round {rnd} {name}: rc={rc} {run['process_s']:.0f} s  {figs}", flush=True)
            round_s.append(time.perf_counter() - t_round)
    save()
    shutil.rmtree(work, ignore_errors=True)
    print(table(record["summary"], [t for t, _ in trees]))
    print(f"wrote {out_path} and {log_path} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(r["ok"] for r in record["runs"]) and record["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
