"""Building the engine for a benchmark and timing strata on a workload."""
from __future__ import annotations

import gc
import json
import random
import statistics
import time
from typing import Any

from strata.bench.models import ResolvedModel, count_parameters, resolve


class BenchError(ValueError):
    """Bad benchmark input (reported as `error: ...`, exit status 2)."""


def engine_args_for(args) -> tuple[Any, ResolvedModel, list[str]]:
    """EngineArgs from the parsed CLI flags, with `--model` resolved (built-in architectures -> a config dir
    with dummy weights). Returns (engine args, resolved model, notes)."""
    from strata.config.engine import EngineArgs
    from strata.bench.models import UnknownModelError
    notes: list[str] = []
    try:
        rm = resolve(args.model)
    except UnknownModelError as e:
        raise BenchError(str(e)) from None
    ea = EngineArgs.from_cli_args(args).replace(model=rm.path)
    if rm.kind == "arch":
        if ea.load_format not in ("auto", "dummy"):
            raise BenchError(f"built-in architecture {rm.arch!r} has no weights: use --load-format dummy")
        ea = ea.replace(load_format="dummy")
    elif rm.kind == "hf" and not rm.has_weights and ea.load_format == "auto":
        ea = ea.replace(load_format="dummy")
        notes.append(f"{rm.path} holds no weight files: random (dummy) weights")
    if ea.data_parallel_size > 1:
        raise BenchError("strata bench runs one engine replica; data parallelism is not measured here yet "
                         "(--data-parallel-size must be 1)")
    if ea.hf_overrides:
        try:
            json.loads(ea.hf_overrides) if isinstance(ea.hf_overrides, str) else None
        except json.JSONDecodeError as e:
            raise BenchError(f"--hf-overrides is not valid JSON: {e}") from None
    return ea, rm, notes


def hf_overrides_dict(ea) -> dict:
    o = ea.hf_overrides
    if not o:
        return {}
    return json.loads(o) if isinstance(o, str) else dict(o)


def build_llm(ea):
    from strata.engine.llm import LLM
    kw = {k: v for k, v in vars(ea).items() if k != "model"}
    t = time.perf_counter()
    llm = LLM(ea.model, **kw)
    return llm, time.perf_counter() - t


def close_llm(llm) -> None:
    """Release the engine (and its GPU memory) so that a baseline can run next in the same process."""
    eng = getattr(llm, "engine", None)
    for obj in (eng, getattr(eng, "executor", None), getattr(eng, "runner", None)):
        fn = getattr(obj, "shutdown", None)
        if callable(fn):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
    del eng
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def engine_summary(llm) -> dict[str, Any]:
    eng = llm.engine
    c = eng.config
    out = {k: getattr(c, k, None) for k in (
        "device", "max_model_len", "block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens",
        "enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "attention_backend",
        "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "load_format", "model_path")}
    out["dtype"] = str(c.dtype).replace("torch.", "")
    mc = getattr(eng, "model_config", None)
    if mc is not None:
        out["architecture"] = mc.architecture
        try:
            out["parameters"] = count_parameters(mc.raw) if mc.raw else None
        except (KeyError, TypeError):
            out["parameters"] = None
    return out


def model_vocab(llm) -> int | None:
    mc = getattr(llm.engine, "model_config", None)
    return getattr(mc, "vocab_size", None)


def check_fits(llm, records) -> None:
    vocab = model_vocab(llm)
    max_len = llm.engine.config.max_model_len
    for i, r in enumerate(records):
        if vocab is not None and max(r["prompt_ids"]) >= vocab:
            raise BenchError(f"request {i} has token ids >= the model's vocabulary ({vocab}); this workload needs "
                             f"a vocabulary of at least {max(r['prompt_ids']) + 1}")
        if len(r["prompt_ids"]) + r["output_len"] > max_len:
            raise BenchError(f"request {i} needs {len(r['prompt_ids'])} + {r['output_len']} tokens but "
                             f"max_model_len is {max_len} (raise --max-model-len or the KV memory)")


def _stats(xs: list[float]) -> dict[str, float] | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    def pct(p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
    return {"mean": statistics.fmean(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": xs[-1]}


def warmup(llm, records, n: int = 8, output_len: int = 4, seed: int = 1234) -> float:
    """A few requests shaped like the workload's first ones, with other token ids (no prefix-cache hits)."""
    from strata.core.sampling_params import SamplingParams
    if n <= 0:
        return 0.0
    vocab = min(model_vocab(llm) or 49152, 49152)
    rng = random.Random(seed)
    prompts = [[rng.randrange(min(100, vocab // 4), vocab) for _ in range(len(r["prompt_ids"]))]
               for r in records[:n]]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t


def run_strata(llm, records, *, progress: bool = False) -> dict[str, Any]:
    """Time `LLM.generate` over the whole workload (EOS ignored, each request its own output length)."""
    from strata.core.sampling_params import SamplingParams
    prompts = [r["prompt_ids"] for r in records]
    params = [SamplingParams(max_tokens=int(r["output_len"]), temperature=0.0, ignore_eos=True) for r in records]
    before = llm.engine.get_stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=progress)
    wall = time.perf_counter() - t0
    after = llm.engine.get_stats()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    expected = sum(int(r["output_len"]) for r in records)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs
            if o.metrics.first_token_time is not None]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outs if o.metrics.finished_time is not None]
    return {
        "wall_s": wall, "num_requests": len(outs), "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "expected_output_tokens": expected, "output_lengths_exact": out_tokens == expected,
        "requests_per_s": len(outs) / wall, "output_tok_s": out_tokens / wall,
        "total_tok_s": (prompt_tokens + out_tokens) / wall,
        "finish_reasons": _count(o.outputs[0].finish_reason for o in outs),
        "preemptions": after.num_preemptions_total - before.num_preemptions_total,
        "prefix_cache_hit_tokens": after.prefix_cache_hits_total - before.prefix_cache_hits_total,
        "ttft_s": _stats(ttft), "e2e_latency_s": _stats(e2e),
    }


def _count(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[str(x)] = out.get(str(x), 0) + 1
    return out
