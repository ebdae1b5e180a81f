"""`strata bench latency`: time per output token at fixed batch sizes, engine already loaded.

For each batch size B, B requests of `input_len` random token ids (fresh ids every iteration, so the prefix
cache never hits) are added at once and stepped to completion, each producing exactly `output_len` tokens
(EOS ignored). Per iteration we record:
  e2e_s          the whole batch, first add to last token
  ttft_ms        per request, add -> first token (mean and max over the batch)
  tpot_ms        per request, (last token - first token) / (output_len - 1), averaged over the batch
  decode_step_ms median duration of the steps in which every request was decoding (one token each)
The figures reported per batch size are medians over the measured iterations.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Any


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    hi = min(vocab, 49152)
    lo = min(100, hi // 4)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def one_iteration(engine, batch: int, input_len: int, output_len: int, seed: int, tag: str) -> dict[str, Any]:
    from strata.core.sampling_params import SamplingParams
    vocab = getattr(getattr(engine, "model_config", None), "vocab_size", 49152)
    prompts = _prompts(batch, input_len, vocab, seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    pre0 = engine.get_stats().num_preemptions_total
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    decode_steps: list[float] = []
    t0 = time.perf_counter()
    rids = [f"{tag}-{j}" for j in range(batch)]
    for rid, p in zip(rids, prompts):
        engine.add_request(rid, p, params)
    prev = time.perf_counter()
    while engine.has_unfinished_requests():
        all_decoding = len(first) == batch and not last
        outs = engine.step()
        now = time.perf_counter()
        if all_decoding and outs:
            decode_steps.append(now - prev)
        prev = now
        for o in outs:
            n = len(o.outputs[0].token_ids)
            counts[o.request_id] = n
            if n >= 1 and o.request_id not in first:
                first[o.request_id] = now
            if o.finished:
                last[o.request_id] = now
    e2e = time.perf_counter() - t0
    ttft = [first[r] - t0 for r in rids]
    tpot = [(last[r] - first[r]) / (output_len - 1) for r in rids] if output_len > 1 else []
    return {"e2e_s": e2e, "ttft_ms_mean": 1e3 * statistics.fmean(ttft), "ttft_ms_max": 1e3 * max(ttft),
            "tpot_ms": 1e3 * statistics.fmean(tpot) if tpot else None,
            "decode_step_ms": 1e3 * statistics.median(decode_steps) if decode_steps else None,
            "output_tokens": sum(counts.values()), "output_tok_s": sum(counts.values()) / e2e,
            "preemptions": engine.get_stats().num_preemptions_total - pre0}


def _median(rows: list[dict[str, Any]], key: str):
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def run_latency(llm, *, batch_sizes: list[int], input_len: int, output_len: int, num_iters: int = 3,
                num_warmup: int = 1, seed: int = 0, log=print) -> dict[str, Any]:
    engine = llm.engine
    cfg = engine.config
    if input_len + output_len > cfg.max_model_len:
        raise ValueError(f"input_len + output_len = {input_len + output_len} exceeds max_model_len "
                         f"{cfg.max_model_len}")
    pool = (cfg.num_blocks - 1) * cfg.block_size
    results: dict[str, Any] = {}
    for b in batch_sizes:
        need = b * (input_len + output_len)
        note = None
        if b > cfg.max_num_seqs:
            note = f"batch {b} > max_num_seqs {cfg.max_num_seqs}: requests queue"
        elif need > pool:
            note = f"batch {b} needs {need} KV slots, the pool holds {pool}: expect preemption"
        for w in range(num_warmup):
            one_iteration(engine, b, input_len, output_len, seed=seed * 1000003 + b * 1009 + 500 + w,
                          tag=f"lat-w{w}-b{b}")
        rows = [one_iteration(engine, b, input_len, output_len, seed=seed * 1000003 + b * 1009 + i,
                              tag=f"lat-{i}-b{b}") for i in range(num_iters)]
        res = {k: _median(rows, k) for k in ("e2e_s", "ttft_ms_mean", "ttft_ms_max", "tpot_ms", "decode_step_ms",
                                             "output_tok_s")}
        res["preemptions"] = sum(r["preemptions"] for r in rows)
        res["iterations"] = rows
        if note:
            res["note"] = note
        results[str(b)] = res
        log(describe(b, res))
    return {"input_len": input_len, "output_len": output_len, "num_iters": num_iters, "num_warmup": num_warmup,
            "results": results}


def describe(b: int, r: dict[str, Any]) -> str:
    def f(x, unit="", nd=2):
        return "n/a" if x is None else f"{x:.{nd}f}{unit}"
    s = (f"batch {b:>4}: TPOT {f(r['tpot_ms'], ' ms')}, decode step {f(r['decode_step_ms'], ' ms')}, "
         f"TTFT {f(r['ttft_ms_mean'], ' ms', 1)} (max {f(r['ttft_ms_max'], ' ms', 1)}), "
         f"e2e {f(r['e2e_s'], ' s', 3)}, {f(r['output_tok_s'], ' tok/s', 1)}")
    if r.get("note"):
        s += f"  [{r['note']}]"
    return s
