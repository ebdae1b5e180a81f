"""`strata bench`: throughput and latency of the engine (with a transformers baseline in the same run),
workload files, and `strata bench serve` (online serving benchmark, `strata.serve.bench`).

    strata bench throughput --model qwen3-4b --dataset sharegpt --num-prompts 1000 \\
        --baseline transformers --output-json benchmarks/results/h200-sharegpt1000.json
    strata bench latency --model qwen3-4b --input-len 1024 --output-len 128 --batch-sizes 1,8,64
    strata bench make-workload sharegpt1000 --out sharegpt1000.json
    strata bench serve --base-url http://127.0.0.1:8000 --dataset sharegpt1000.json

Workloads are those of ../shared/BENCHMARK-PROTOCOL.md (`strata.bench.workloads`). `--model` takes a model
directory, a .gguf file, a hub id, or a built-in architecture name (qwen3-4b, llama-3-8b, ...) that runs with
random weights.
"""
from __future__ import annotations

import argparse
import sys

DATASETS = ("sharegpt", "sharegpt1000", "seed64", "cpu256", "random")


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark the engine (throughput, latency, serve)",
                           description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = bench.add_subparsers(dest="bench_command", metavar="KIND")
    bench.set_defaults(func=lambda a: _help(bench))

    from strata.config.engine import EngineArgs

    # ---------------------------------------------------------------- throughput
    t = bsub.add_parser("throughput", help="offline throughput on a workload (+ transformers baseline)",
                        description="Offline throughput: every request of the workload at once, EOS ignored, "
                                    "each request producing exactly its output length; the engine is loaded "
                                    "and warmed up before the clock starts.")
    _workload_args(t)
    t.add_argument("--warmup-requests", type=int, default=8,
                   help="requests (other token ids, 4 output tokens) run before timing; 0 for none")
    t.add_argument("--progress", action="store_true", help="progress bar while timing")
    b = t.add_argument_group("baseline")
    b.add_argument("--baseline", choices=["transformers"], default=None,
                   help="also run transformers on the same workload and model configuration in this process")
    b.add_argument("--baseline-modes", default="static,static-all,cb",
                   help="comma-separated: static (generate, left-padded batches as the seed does), static-all "
                        "(one batch of the whole workload, if it fits), cb (continuous batching)")
    b.add_argument("--baseline-batch-size", type=int, default=16, help="batch size of the static mode (seed: 16)")
    b.add_argument("--baseline-timeout", type=float, default=240.0,
                   help="seconds per baseline mode; requests unfinished by then are not counted (0: no limit)")
    b.add_argument("--baseline-whole-batch", choices=["auto", "always", "never"], default="auto",
                   help="static-all: run only if the estimate fits in free memory (auto)")
    b.add_argument("--baseline-cb-options", default=None,
                   help="JSON of transformers ContinuousBatchingConfig fields, e.g. '{\"num_blocks\": 4096}'")
    b.add_argument("--skip-strata", action="store_true", help="run only the baseline (debugging)")
    t.add_argument("--output-json", default=None, help="write every figure here")
    EngineArgs.add_cli_args(t)
    t.set_defaults(func=run_throughput, _parser=t)

    # ---------------------------------------------------------------- latency
    lat = bsub.add_parser("latency", help="time per output token at fixed batch sizes, and TTFT",
                          description="Latency with the engine loaded: B requests of --input-len random tokens "
                                      "added at once, each producing --output-len tokens (EOS ignored).")
    lat.add_argument("--input-len", type=int, default=1024)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--batch-sizes", default="1,8,64", help="comma-separated batch sizes")
    lat.add_argument("--num-iters", type=int, default=3, help="measured iterations per batch size (median)")
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument("--dataset-seed", type=int, default=0)
    lat.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(lat)
    lat.set_defaults(func=run_latency, _parser=lat)

    # ---------------------------------------------------------------- make-workload
    mk = bsub.add_parser("make-workload", help="write a workload JSON (to carry to a machine without the data set)")
    mk.add_argument("name", choices=DATASETS)
    mk.add_argument("--out", required=True, help="output JSON file")
    mk.add_argument("--num-prompts", type=int, default=None)
    mk.add_argument("--input-len", type=int, default=None, help="random only (default 1024)")
    mk.add_argument("--output-len", type=int, default=None, help="random: default 128; others: override")
    mk.add_argument("--dataset-seed", type=int, default=0, help="random only")
    mk.add_argument("--vocab-size", type=int, default=None, help="random only: ids below this")
    mk.set_defaults(func=run_make_workload)

    # ---------------------------------------------------------------- serve
    from strata.serve import bench as serve_bench
    sv = bsub.add_parser("serve", help="online serving benchmark against an OpenAI-compatible server",
                         description=(serve_bench.__doc__ or "").split("\n\n")[0])
    serve_bench.add_args(sv)
    sv.set_defaults(func=serve_bench.main_args)


def _help(p) -> int:
    p.print_help()
    return 2


def _workload_args(p) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="sharegpt",
                   help="workload (../shared/BENCHMARK-PROTOCOL.md); sharegpt takes --num-prompts (default 1000)")
    g.add_argument("--workload-file", default=None,
                   help="read the workload from this JSON ([{prompt_ids, output_len}]) instead of building it")
    g.add_argument("--num-prompts", type=int, default=None, help="requests (default: the workload's size; random 1000)")
    g.add_argument("--input-len", type=int, default=None, help="random: prompt tokens (default 1024)")
    g.add_argument("--output-len", type=int, default=None,
                   help="random: output tokens (default 128); other workloads: override every request's")
    g.add_argument("--dataset-seed", type=int, default=0, help="seed of the random workload")


def _command(args, words: list[str]) -> list[str]:
    """The command as typed: sys.argv when this process is `strata bench ...`, else rebuilt from the parsed
    flags (called in-process, e.g. from tests or another tool)."""
    argv = sys.argv[1:]
    if "bench" in argv and words[-1] in argv:
        return sys.argv
    parser = getattr(args, "_parser", None)
    out = ["strata", *words]
    if parser is None:
        return out
    for a in parser._actions:  # noqa: SLF001 - argparse has no public listing
        if not a.option_strings or a.dest in ("help",) or not hasattr(args, a.dest):
            continue
        v = getattr(args, a.dest)
        if v == a.default:
            continue
        flag = a.option_strings[0]
        if isinstance(a, argparse.BooleanOptionalAction):
            out.append(flag if v else "--no-" + flag[2:])
        elif a.nargs == 0:
            out.append(flag)
        else:
            out += [flag, str(v)]
    return out


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _known_errors():
    from strata.bench.engine_run import BenchError
    from strata.bench.workloads import WorkloadError
    from strata.core.errors import StrataError
    from strata.core.sampling_params import ParameterError
    return (BenchError, WorkloadError, StrataError, ParameterError, FileNotFoundError)


def _load_workload(args, vocab: int | None):
    from strata.bench import workloads as W
    if args.dataset != "random" and args.input_len is not None and not args.workload_file:
        raise W.WorkloadError("--input-len applies to --dataset random only")
    for flag in ("num_prompts", "input_len", "output_len"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise W.WorkloadError(f"--{flag.replace('_', '-')} must be >= 1")
    recs, source = W.load(args.dataset, args.num_prompts, file=args.workload_file, input_len=args.input_len,
                          output_len=args.output_len, seed=args.dataset_seed, vocab_size=vocab)
    if args.output_len is not None and (args.dataset != "random" or args.workload_file):
        recs = W.with_output_len(recs, args.output_len)
    return recs, source


def _config_vocab(rm, ea) -> int | None:
    from strata.bench.engine_run import hf_overrides_dict
    cfg = dict(rm.config or {})
    cfg.update(hf_overrides_dict(ea))
    v = cfg.get("vocab_size")
    return int(v) if isinstance(v, int) else None


# ---------------------------------------------------------------------------------------------- throughput
def run_throughput(args) -> int:
    from strata.bench import meta, workloads as W
    from strata.bench.engine_run import (build_llm, check_fits, close_llm, engine_args_for, engine_summary,
                                         hf_overrides_dict, run_strata, warmup)
    errors = _known_errors()
    modes = [m.strip() for m in args.baseline_modes.split(",") if m.strip()]
    from strata.bench.hf_baseline import MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        return _err(f"unknown baseline mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if args.baseline_batch_size < 1:
        return _err("--baseline-batch-size must be >= 1")
    cb_options = None
    if args.baseline_cb_options:
        import json
        try:
            cb_options = json.loads(args.baseline_cb_options)
            assert isinstance(cb_options, dict)
        except (ValueError, AssertionError):
            return _err("--baseline-cb-options must be a JSON object")
    if args.skip_strata and not args.baseline:
        return _err("--skip-strata needs --baseline")
    try:
        ea, rm, notes = engine_args_for(args)
        records, source = _load_workload(args, _config_vocab(rm, ea))
    except errors as e:
        return _err(str(e))
    wl = {"name": "file" if args.workload_file else args.dataset, "source": source, **W.summary(records)}
    _log(f"workload {wl['name']}: {wl['num_requests']} requests, {wl['prompt_tokens']} prompt tokens, "
         f"{wl['output_tokens']} output tokens ({source})")
    for n in notes:
        _log(f"note: {n}")
    result = {"benchmark": "throughput", "model": _model_info(args, rm, ea), "workload": wl, "notes": notes}
    strata_res = None
    device, dtype = None, None
    llm = None
    try:
        if args.skip_strata:
            device, dtype = _device_dtype(ea)
        else:
            llm, load_s = build_llm(ea)
            device, dtype = llm.engine.config.device, llm.engine.config.dtype
            result["engine"] = engine_summary(llm)
            result["engine_load_s"] = load_s
            check_fits(llm, records)
            result["warmup_s"] = warmup(llm, records, n=args.warmup_requests)
            _log(f"engine loaded in {load_s:.1f} s; timing {len(records)} requests ...")
            strata_res = run_strata(llm, records, progress=args.progress)
            result["strata"] = strata_res
    except errors as e:
        return _err(str(e))
    finally:
        if llm is not None:
            close_llm(llm)
            del llm
    result = {**meta.run_meta(device, _command(args, ["bench", "throughput"])), **result}
    if strata_res:
        print(_describe_strata(strata_res, result))
    if args.baseline == "transformers":
        if device is not None and str(device).startswith("cuda"):
            import torch
            free_b, total_b = torch.cuda.mem_get_info()
            result["gpu_free_after_engine_closed_gib"] = round(free_b / 2**30, 2)
        from strata.bench.hf_baseline import run_baseline
        limit = args.baseline_timeout if args.baseline_timeout and args.baseline_timeout > 0 else None
        base = run_baseline(rm, hf_overrides_dict(ea), records, device=device, dtype=dtype,
                            load_format=ea.load_format, modes=modes, batch_size=args.baseline_batch_size,
                            time_limit=limit, whole=args.baseline_whole_batch, cb_options=cb_options, log=_log)
        result["baseline"] = base
        if "error" in base:
            print(f"transformers baseline failed to load: {base['error']}")
        result["ratios"] = _ratios(strata_res, base) if strata_res else {}
        for line in _describe_ratios(result["ratios"], base):
            print(line)
    if args.output_json:
        meta.write_json(args.output_json, result)
        print(f"wrote {args.output_json}")
    return 0


def _device_dtype(ea):
    import torch
    device = ea.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    table = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "half": torch.float16}
    if ea.dtype == "auto":
        return device, torch.float32 if device == "cpu" else torch.bfloat16
    if ea.dtype not in table:
        from strata.bench.engine_run import BenchError
        raise BenchError(f"unknown dtype {ea.dtype!r}")
    return device, table[ea.dtype]


def _model_info(args, rm, ea) -> dict:
    return {"arg": args.model, "kind": rm.kind, "arch": rm.arch, "path": rm.path, "load_format": ea.load_format,
            "hf_overrides": ea.hf_overrides, "dtype_arg": ea.dtype}


def _describe_strata(r: dict, result: dict) -> str:
    eng = result.get("engine", {})
    lines = [f"strata on {result.get('device')} ({eng.get('architecture')}, {eng.get('dtype')}):",
             f"  requests/s       {r['requests_per_s']:.2f}",
             f"  output tok/s     {r['output_tok_s']:.1f}",
             f"  total tok/s      {r['total_tok_s']:.1f}",
             f"  wall time        {r['wall_s']:.3f} s  ({r['num_requests']} requests, {r['prompt_tokens']} prompt + "
             f"{r['output_tokens']} output tokens)"]
    if not r["output_lengths_exact"]:
        lines.append(f"  WARNING: {r['output_tokens']} output tokens, {r['expected_output_tokens']} expected")
    if r.get("preemptions"):
        lines.append(f"  preemptions      {r['preemptions']}")
    return "\n".join(lines)


def _ratios(s: dict, base: dict) -> dict:
    out = {}
    for mode, r in (base.get("modes") or {}).items():
        if r.get("output_tok_s"):
            out[mode] = {"output_tok_s": s["output_tok_s"] / r["output_tok_s"],
                         "baseline_all_finished": r.get("all_finished")}
            if r.get("all_finished"):
                out[mode]["wall_time_speedup"] = r["wall_s"] / s["wall_s"]
    return out


def _describe_ratios(ratios: dict, base: dict) -> list[str]:
    lines = [f"transformers {base.get('version')} baseline (same process, same workload):"]
    for mode, r in (base.get("modes") or {}).items():
        from strata.bench.hf_baseline import describe
        lines.append("  " + describe(r))
        if mode in ratios:
            x = ratios[mode]
            s = f"    strata / transformers {mode}: {x['output_tok_s']:.2f}x output tok/s"
            if "wall_time_speedup" in x:
                s += f", {x['wall_time_speedup']:.2f}x wall time"
            lines.append(s)
    return lines


# ---------------------------------------------------------------------------------------------- latency
def run_latency(args) -> int:
    from strata.bench import meta
    from strata.bench.engine_run import build_llm, close_llm, engine_args_for, engine_summary
    from strata.bench.latency import run_latency as _run
    errors = _known_errors()
    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        return _err(f"--batch-sizes {args.batch_sizes!r} must be comma-separated integers")
    if not sizes or min(sizes) < 1 or args.input_len < 1 or args.output_len < 1 or args.num_iters < 1:
        return _err("--batch-sizes, --input-len, --output-len and --num-iters must be >= 1")
    llm = None
    try:
        ea, rm, notes = engine_args_for(args)
        for n in notes:
            _log(f"note: {n}")
        llm, load_s = build_llm(ea)
        device = llm.engine.config.device
        result = {"benchmark": "latency", "model": _model_info(args, rm, ea), "engine": engine_summary(llm),
                  "engine_load_s": load_s, "notes": notes}
        _log(f"engine loaded in {load_s:.1f} s")
        result.update(_run(llm, batch_sizes=sizes, input_len=args.input_len, output_len=args.output_len,
                           num_iters=args.num_iters, num_warmup=args.num_iters_warmup, seed=args.dataset_seed,
                           log=print))
    except errors as e:
        return _err(str(e))
    except ValueError as e:
        return _err(str(e))
    finally:
        if llm is not None:
            close_llm(llm)
            del llm
    result = {**meta.run_meta(device, _command(args, ["bench", "latency"])), **result}
    if args.output_json:
        meta.write_json(args.output_json, result)
        print(f"wrote {args.output_json}")
    return 0


# ---------------------------------------------------------------------------------------------- make-workload
def run_make_workload(args) -> int:
    from strata.bench import workloads as W
    try:
        for flag in ("num_prompts", "input_len", "output_len"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise W.WorkloadError(f"--{flag.replace('_', '-')} must be >= 1")
        if args.name != "random" and args.input_len is not None:
            raise W.WorkloadError("--input-len applies to random only")
        recs, source = W.load(args.name, args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                              seed=args.dataset_seed, vocab_size=args.vocab_size)
        if args.output_len is not None and args.name != "random":
            recs = W.with_output_len(recs, args.output_len)
    except _known_errors() as e:
        return _err(str(e))
    W.save(recs, args.out)
    s = W.summary(recs)
    print(f"wrote {args.out}: {s['num_requests']} requests, {s['prompt_tokens']} prompt tokens, "
          f"{s['output_tokens']} output tokens (from {source})")
    return 0
