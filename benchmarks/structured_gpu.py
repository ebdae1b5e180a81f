"""Structured outputs on one GPU (issue 20's figures), in one call and one engine:

  1. time to first compile: the grammar backend's set-up (xgrammar's tokenizer info) and the first compile of
     the 6-field schema, cold;
  2. sharegpt1000, unconstrained (EOS ignored, each request its own output length) vs every request under the
     6-field JSON schema (max_tokens = the request's output length) vs unconstrained again with each request's
     output length set to what it produced under the schema (the same work as the schema run: schema rows end
     early, ~53 of ~204 tokens, so the first comparison mixes the grammar's cost with a prefill-heavier run),
     alternating, `--rounds` times: output tok/s of each, the ratios (issue: >= 0.90), the host time the grammar
     took (bitmask fill + masked sampling launch, token accepts), and the schema-valid rate of the constrained rows
     that ended by the grammar (finish "stop"; issue: 100%) checked with jsonschema;
  3. batch 1: time per output token with the schema vs without (1024-token prompt, 128 output tokens; the schema's
     long string field keeps a constrained request going to max_tokens), median of `--latency-iters`;
  4. compile cost of a 50-field schema (cold, distinct field names each time), median of 5.

    python benchmarks/structured_gpu.py --out $OUT/structured.json                 # H200: Qwen3-4B arch, dummy bf16
    python benchmarks/structured_gpu.py --smoke --out /tmp/structured-smoke.json   # CPU, seconds

The GPU machine has no network: xgrammar must be carried (`pip download xgrammar==0.2.9 apache-tvm-ffi
--no-deps -d .carry/wheels`, then there `pip install --no-deps .carry/wheels/*.whl`); without it this script
says so and exits 2. Workloads and tokenizer as benchmarks/ab_trees.py (.carry/workloads, .carry/tok).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_trees import (GPU_ENGINE_ARGS, SMOKE_ENGINE_ARGS, _load_records, _random_records,  # noqa: E402
                      find_tokenizer, find_workloads)

SCHEMA6 = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.(com|org|net)$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "active": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["name", "age", "email", "tags", "active", "score"],
    "additionalProperties": False,
}
LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}


def schema50(tag: str) -> dict:
    kinds = [{"type": "string", "maxLength": 32}, {"type": "integer", "minimum": 0, "maximum": 1000},
             {"type": "number"}, {"type": "boolean"}, {"enum": ["a", "b", "c"]},
             {"type": "array", "items": {"type": "integer"}, "maxItems": 5},
             {"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "integer"}},
              "required": ["x", "y"]}]
    props = {f"{tag}_field_{i}": kinds[i % len(kinds)] for i in range(50)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def need_xgrammar() -> str:
    try:
        import xgrammar
    except ImportError:
        print("error: xgrammar is not installed here (this machine has no network). Carry the wheels: on a machine "
              "with PyPI `pip download xgrammar==0.2.9 apache-tvm-ffi --no-deps -d .carry/wheels`, then here "
              "`pip install --no-deps .carry/wheels/*.whl`", file=sys.stderr)
        raise SystemExit(2)
    return xgrammar.__version__ if hasattr(xgrammar, "__version__") else "?"


class HostTimer:
    """Host time spent on the grammar inside one run: filling bitmasks (`LLMEngine._sample_grammar`, which also
    launches the masked sampling) and accepting tokens (`RequestGrammar.accept`, in the scheduler's update).
    Wraps the engine's own methods for the run; nothing in the engine changes."""

    def __init__(self, eng):
        from strata.structured.backend import RequestGrammar
        self.eng, self.cls, self.fill_s, self.accept_s, self.accepts = eng, RequestGrammar, 0.0, 0.0, 0
        self._sample, self._accept = eng._sample_grammar, RequestGrammar.accept

    def __enter__(self):
        timer, sample, accept = self, self._sample, self._accept

        def timed_sample(handle):
            t = time.perf_counter()
            sample(handle)
            timer.fill_s += time.perf_counter() - t

        def timed_accept(g, token):
            t = time.perf_counter()
            ok = accept(g, token)
            timer.accept_s += time.perf_counter() - t
            timer.accepts += 1
            return ok
        self.eng._sample_grammar, self.cls.accept = timed_sample, timed_accept
        return self

    def __exit__(self, *exc):
        self.eng._sample_grammar, self.cls.accept = self._sample, self._accept


def run(llm, records, so, lengths: list[int] | None = None) -> dict:
    """One pass over `records`: unconstrained (each request's own output length, EOS ignored; or `lengths`, the
    constrained run's output lengths, so both runs do the same work) or every request under `so`."""
    import jsonschema
    from strata.core.sampling_params import SamplingParams
    prompts = [r["prompt_ids"] for r in records]
    if so is None:
        outs_len = lengths or [int(r["output_len"]) for r in records]
        params = [SamplingParams(max_tokens=max(1, n), temperature=0.0, ignore_eos=True) for n in outs_len]
    else:
        params = [SamplingParams(max_tokens=int(r["output_len"]), temperature=0.0, structured_outputs=so)
                  for r in records]
    with HostTimer(llm.engine) as timer:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    res = {"wall_s": wall, "output_tokens": toks, "output_tok_s": toks / wall, "requests": len(outs),
           "output_lengths": [len(o.outputs[0].token_ids) for o in outs]}
    if so is not None:
        res["host_s"] = {"fill_bitmask_and_sample": timer.fill_s, "accept": timer.accept_s, "accepts": timer.accepts}
    if so is not None:
        stop = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
        valid, invalid = 0, []
        for c in stop:
            try:
                jsonschema.validate(json.loads(c.text), so.json)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as e:
                if len(invalid) < 5:  # what failed, for whoever looks into it (2026-12-03: 20 of 606 on an H200)
                    invalid.append({"text": c.text[:600], "token_ids": list(c.token_ids)[:200],
                                    "error": str(e).splitlines()[0][:300]})
        res.update(finished_by_grammar=len(stop), schema_valid=valid, invalid_examples=invalid,
                   schema_valid_rate=valid / len(stop) if stop else None,
                   finish_reasons={r: sum(o.outputs[0].finish_reason == r for o in outs) for r in ("stop", "length")})
    return res


def tpot(llm, prompt, so, iters: int, out_len: int) -> dict:
    from strata.core.sampling_params import SamplingParams
    p = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=so is None, structured_outputs=so)
    vals = []
    for _ in range(iters + 1):
        o = llm.generate([prompt], p, use_tqdm=False)[0]
        m, n = o.metrics, len(o.outputs[0].token_ids)
        if n > 1:
            vals.append((m.finished_time - m.first_token_time) / (n - 1) * 1e3)
    vals = vals[1:]  # the first is a warm-up
    return {"tpot_ms": statistics.median(vals), "tpot_ms_iterations": vals, "output_tokens": n}


def accept_costs(backend, so, rows: int = 256) -> dict:
    """xgrammar's cost per accepted token on this host, outside the engine: `rows` matchers walk random allowed
    tokens of the schema (the bitmask each step), accepting one call per row (as the scheduler does) or one
    `BatchGrammarMatcher.batch_accept_token` call per step (slower on a 2-core CPU: 12 vs 7 us per token)."""
    import random

    import torch
    import xgrammar as xgr
    from strata.structured.backend import RequestGrammar
    fut = backend.prepare(so)
    rng = random.Random(0)
    shifts = torch.arange(32, dtype=torch.int32)
    out = {}
    for mode in ("per_row", "batch"):
        gs = [RequestGrammar(fut) for _ in range(rows)]
        mask = backend.new_bitmask(rows)
        spent = n = 0
        fill = 0.0
        for _ in range(200):
            live = [g for g in gs if not g.is_terminated()]
            if not live:
                break
            t = time.perf_counter()
            backend.fill_bitmask(live, mask[:len(live)])
            fill += time.perf_counter() - t
            allowed = ((mask[:len(live)].unsqueeze(-1) >> shifts) & 1).view(len(live), -1)
            toks = []
            for i in range(len(live)):
                ids = allowed[i].nonzero().flatten()
                toks.append(int(ids[rng.randrange(len(ids))]))
            t = time.perf_counter()
            if mode == "batch":
                xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g in live], toks)
            else:
                for g, tok in zip(live, toks):
                    g.matcher.accept_token(tok)
            spent += time.perf_counter() - t
            n += len(live)
        out[mode] = {"accept_us_per_token": spent / n * 1e6, "fill_us_per_row": fill / n * 1e6, "tokens": n}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few requests")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-iters", type=int, default=5)
    ap.add_argument("--workloads", default=None)
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args()
    version = need_xgrammar()
    from strata import bench_cli
    from strata.bench.engine_run import build_llm, engine_args_for, warmup
    from strata.core.sampling_params import StructuredOutputsParams as SO
    tok = find_tokenizer(args.tokenizer, args.smoke)
    eargs = (SMOKE_ENGINE_ARGS if args.smoke else GPU_ENGINE_ARGS) + (["--tokenizer", tok] if tok else [])
    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers(dest="cmd"))
    ea, _, notes = engine_args_for(parser.parse_args(["bench", "latency", *eargs]))
    llm, load_s = build_llm(ea)
    eng = llm.engine
    wl = find_workloads(args.workloads)
    if args.smoke or wl is None:
        if not args.smoke:
            raise SystemExit("error: no workloads (.carry/workloads); `python benchmarks/run.py carry`")
        records = _random_records(8, 32, 128, 49152, 0)  # long enough for the schema to end
    else:
        records = _load_records(os.path.join(wl, "sharegpt1000.json"))
    out: dict = {"xgrammar": version, "engine_args": eargs, "notes": notes, "load_s": load_s,
                 "device": str(eng.config.device), "async_scheduling": eng.async_scheduling,
                 "vocab_size": eng.model_config.vocab_size, "tokenizer_size": len(eng.tokenizer.hf)}

    def save():
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    so6 = SO(json=SCHEMA6, disable_any_whitespace=True)  # compact: random weights would pad with whitespace
    t = time.perf_counter()
    backend = eng.grammars
    out["backend_setup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    backend.compile_now(so6)
    out["first_compile_s"] = time.perf_counter() - t
    print(f"backend set-up {out['backend_setup_s']:.3f} s, first compile (6 fields) {out['first_compile_s']:.3f} s",
          file=sys.stderr, flush=True)
    out["accept_costs"] = accept_costs(backend, so6)
    print(f"xgrammar on this host: {out['accept_costs']}", file=sys.stderr, flush=True)
    out["warmup_s"] = warmup(llm, records, n=8)
    out["rounds"] = []
    for r in range(args.rounds):
        free = run(llm, records, None)
        con = run(llm, records, so6)
        same = run(llm, records, None, lengths=con["output_lengths"])
        out["rounds"].append({"unconstrained": free, "schema": con, "unconstrained_same_lengths": same})
        print(f"round {r}: unconstrained {free['output_tok_s']:.1f} tok/s, schema {con['output_tok_s']:.1f} tok/s, "
              f"unconstrained at the schema's lengths {same['output_tok_s']:.1f} tok/s, "
              f"valid {con['schema_valid']}/{con['finished_by_grammar']}, host {con['host_s']}", file=sys.stderr,
              flush=True)
        save()
    best = {k: max(x[k]["output_tok_s"] for x in out["rounds"])
            for k in ("unconstrained", "schema", "unconstrained_same_lengths")}
    out["sharegpt_ratio_best"] = best["schema"] / best["unconstrained"]
    # the grammar's own cost: the same prompts and output lengths with and without the schema
    out["sharegpt_ratio_same_lengths_best"] = best["schema"] / best["unconstrained_same_lengths"]
    n_in, n_out = (64, 16) if args.smoke else (1024, 128)
    prompt = list(range(100, 100 + n_in))
    out["batch1"] = {"unconstrained": tpot(llm, prompt, None, args.latency_iters, n_out),
                     "schema": tpot(llm, prompt, SO(json=LONG), args.latency_iters, n_out)}
    b = out["batch1"]
    out["batch1"]["ratio"] = b["schema"]["tpot_ms"] / b["unconstrained"]["tpot_ms"]
    save()
    costs = []
    for i in range(5):
        so = SO(json=schema50(f"r{i}"))
        t = time.perf_counter()
        backend.compile_now(so)
        costs.append(time.perf_counter() - t)
    out["compile_50_fields_s"] = {"median": statistics.median(costs), "all": costs}
    save()
    print(json.dumps({k: out[k] for k in ("first_compile_s", "sharegpt_ratio_best", "sharegpt_ratio_same_lengths_best",
                                          "compile_50_fields_s")}),
          f"batch1 ratio {b['ratio']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
