"""Model parallelism on GPUs (NCCL): parity, latency, throughput, a model too large for one GPU, overlap on/off.

    python benchmarks/parallel_gpu.py --out results_dir [--workloads DIR] [--cases parity,latency8b,...]
                                      [--quick]

Run on 2 x H200 (one host). Every case runs in a fresh child process (clean GPU memory, fresh NCCL), with
random bf16 weights of the real architecture (`--load-format dummy`, the protocol's standard) written as a
config directory here; EOS is ignored so every request produces exactly its output length.

Cases (each writes <out>/parallel_gpu-<case>.json; all of them also go to <out>/parallel_gpu.json as
{"runs": [...]} records that benchmarks/plan_vs_measured.py reads):
  smoke        tiny float32 model: TP=2 / PP=2 eager, then with CUDA graphs, against TP=1 (a hang shows up
               here first: every rank prints its stacks after 120 s, STRATA_HANG_DUMP_S)
  parity       reference model (Qwen3-4B arch) from a random safetensors checkpoint written once (dummy weights
               are drawn per rank, so TP shards would differ from TP=1's weights): greedy tokens of TP=2 and PP=2
               against TP=1, 8 prompts x 64 tokens, --parity-dtypes (float32 is the exactness check; bf16 sums
               split over ranks round differently and random weights give near-ties) and --parity-layouts
  latency8b    Llama-3-8B arch, batch 1, 1024-token prompt, 128 tokens: TP=1, TP=2, TP=2 with the
               symmetric-memory all-reduce (--full: eager variants too); target TP=2 <= 0.7 x TP=1
  sharegpt     reference model, sharegpt1000: DP=1 (one GPU), DP=2 (target >= 1.9x), TP=2, PP=2
               (sharegpt_dp: DP=1 and DP=2 only; sharegpt_mp: the --sharegpt-mp layouts)
  big70b       Llama-3-70B arch (141 GB bf16: does not fit one H200): TP=2 and PP=2, each one engine for batch-1
               latency and a 256-request random 512/128 throughput run, memory per GPU
  overlap      Llama-3-8B arch, TP=2: --tp-comm-overlap on vs off: prefill throughput (32 x 2048-token prompts,
               1 output token) and batch-1 time per token
  moe          Qwen3-30B-A3B arch (128 experts, top-8): one GPU, TP=2 with TP-sharded experts, TP=2 with expert
               parallelism: batch-1 latency and 256 x 512/128 throughput, memory per GPU
--quick shrinks every workload (a smoke run of the script itself).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "src"))


def _arch(name: str) -> dict:
    """The architecture's HF config (`strata bench`'s table: qwen3-4b, llama-3-8b, llama-3-70b, qwen3-30b-a3b)."""
    from strata.bench.models import ARCHITECTURES
    return dict(ARCHITECTURES[name])


# async_scheduling off: the multiprocess executor (TP/PP) steps synchronously, so the single-GPU baselines do too
ENGINE = dict(load_format="dummy", max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192,
              gpu_memory_utilization=0.9, dist_timeout=600.0, async_scheduling=False)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


DRY = False  # --dry-run: the whole script on CPU with shrunken models (checks the script, measures nothing)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, head_dim=16)


def model_dir(arch: str, base: str) -> str:
    d = os.path.join(base, arch)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({**_arch(arch), **(TINY if DRY else {})}, f)
    return d


def checkpoint_dir(arch: str, base: str, dtype: str = "bfloat16", overrides: dict | None = None) -> str:
    """A real safetensors checkpoint of `arch` (with config `overrides`, e.g. fewer layers) with random weights,
    written once per run. Parity runs need it: `--load-format dummy` draws each rank's shard on its own, so
    TP=2's weights would not be TP=1's."""
    import torch
    tag = "".join(f"-{k}{v}" for k, v in sorted((overrides or {}).items()))
    d = os.path.join(base, f"{arch}{tag}-ckpt-{dtype}")
    if os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
        return d
    import transformers as tf
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    cfg_dict = {**_arch(arch), **(overrides or {}), **(TINY if DRY else {}), "torch_dtype": dtype}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_dict, f)
    cfg = tf.AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in tf.AutoModelForCausalLM.from_config(cfg).named_parameters()]
    dev = "cuda" if torch.cuda.is_available() and not DRY else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    tdt = getattr(torch, dtype)
    index, shard, size, k = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, k
        if shard:
            name = f"model-{k:05d}.safetensors"
            save_file(shard, os.path.join(d, name), metadata={"format": "pt"})
            index.update({n: name for n in shard})
            shard, size, k = {}, 0, k + 1

    t = time.perf_counter()
    for n, shp in shapes:
        w = (torch.ones(shp, device=dev) if n.endswith("norm.weight") else
             torch.empty(shp, device=dev).uniform_(-0.05, 0.05, generator=g)).to(tdt).cpu()
        shard[n] = w
        size += w.numel() * w.element_size()
        if size > (2 << 30):
            flush()
    flush()
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    log(f"   wrote a random {arch} checkpoint ({dtype}, {len(index)} tensors) in {time.perf_counter() - t:.0f} s")
    return d


def find_workloads(explicit: str | None) -> str | None:
    for d in [explicit, os.path.join(ROOT, "..", "shared", "workloads"), os.path.join(ROOT, "shared", "workloads"),
              os.path.join(ROOT, ".carry", "workloads"), os.path.join(ROOT, ".carry", "bench-workloads")]:
        if d and os.path.isfile(os.path.join(d, "sharegpt1000.json")):
            return d
    return None


# ------------------------------------------------------------------------------------------ child side
def _sync():
    import torch
    if torch.cuda.is_available() and ENGINE.get("device") != "cpu":
        torch.cuda.synchronize()


def _engine(path: str, **kw):
    from strata.config.engine import EngineArgs
    from strata.engine.llm_engine import LLMEngine
    t = time.perf_counter()
    engine = LLMEngine.from_engine_args(EngineArgs(model=path, **{**ENGINE, **kw}))
    return engine, time.perf_counter() - t


def _close(engine):
    close = getattr(engine, "shutdown", None)
    if callable(close):
        close()


def _drain(engine) -> dict:
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o
    return out


def _memory(engine) -> list[dict]:
    import torch
    r = engine.runner
    if hasattr(r, "collective_rpc"):
        return r.collective_rpc("memory")
    params = sum(p.numel() * p.element_size() for p in r.model.parameters())
    kv = sum(k.numel() * k.element_size() * 2 for k, _ in r.kv_caches)
    return [{"weights_bytes": params, "kv_cache_bytes": kv, "max_allocated_bytes": torch.cuda.max_memory_allocated()}]


def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 30000, (length,), generator=g).tolist() for _ in range(n)]


def child_parity(path, layout, dtype, n_tok, extra=None):
    from strata.core.sampling_params import SamplingParams
    engine, load_s = _engine(path, dtype=dtype, **layout, **(extra or {}))
    try:
        ps = _prompts(8, 100)
        for i, p in enumerate(ps):
            engine.add_request(str(i), p[: 20 + 10 * i], SamplingParams(max_tokens=n_tok, temperature=0.0,
                                                                       ignore_eos=True, logprobs=5))
        outs = _drain(engine)
        # top-5 logprobs per output token, to measure the margin wherever two layouts' greedy tokens diverge
        lps = [[{str(t): round(lp.logprob, 5) for t, lp in (d or {}).items()} for d in outs[str(i)].outputs[0].logprobs]
               for i in range(8)]
        return {"tokens": [outs[str(i)].outputs[0].token_ids for i in range(8)], "logprobs": lps,
                "load_s": round(load_s, 1)}
    finally:
        _close(engine)


def _latency(engine, ctx: int, n_out: int) -> dict:
    from strata.core.sampling_params import SamplingParams
    prompt = _prompts(1, ctx, seed=3)[0]
    engine.add_request("warm", prompt[:64], SamplingParams(max_tokens=8, ignore_eos=True))
    _drain(engine)
    engine.add_request("lat", prompt, SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True))
    # Token arrival times as the caller sees them (with overlapped steps a step returns the previous step's
    # tokens, so per-step times are not per-token times).
    _sync()
    t0 = time.perf_counter()
    arrivals, seen = [], 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            n = len(o.outputs[0].token_ids)
            now = time.perf_counter()
            arrivals += [now] * (n - seen)
            seen = n
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    return {"batch": 1, "context": ctx, "output": n_out, "ttft_ms": round((arrivals[0] - t0) * 1e3, 2),
            "tpot_ms": round((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) * 1e3, 3),
            "tpot_median_ms": round(gaps[len(gaps) // 2] * 1e3, 3)}


def child_latency(path, layout, ctx, n_out, extra=None):
    engine, load_s = _engine(path, **layout, **(extra or {}))
    try:
        r = _latency(engine, ctx, n_out)
        r.update(load_s=round(load_s, 1), memory=_memory(engine))
        return r
    finally:
        _close(engine)


def _throughput(generate, records, label) -> dict:
    from strata.core.sampling_params import SamplingParams
    ps = [SamplingParams(max_tokens=r["output_len"], temperature=0.0, ignore_eos=True) for r in records]
    t = time.perf_counter()
    outs = generate([r["prompt_ids"] for r in records], ps)
    _sync()
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(r["prompt_ids"]) for r in records)
    return {"workload": label, "requests": len(records), "seconds": round(dt, 3), "output_tokens": n_out,
            "output_tok_s": round(n_out / dt, 1), "total_tok_s": round((n_in + n_out) / dt, 1)}


def child_throughput(path, layout, records, label, dp=1, extra=None):
    kw = {**layout, **(extra or {})}
    if dp > 1:
        from strata.engine.dp import DataParallelLLM
        t = time.perf_counter()
        llm = DataParallelLLM(path, data_parallel_size=dp, **{**ENGINE, **kw})
        load_s = time.perf_counter() - t
        try:
            llm.generate(_prompts(4, 64, seed=99), None)  # warm-up (prompts unlike the workload's: no cache hits)
            r = _throughput(lambda p, s: llm.generate(p, s), records, label)
        finally:
            llm.shutdown()
        r.update(load_s=round(load_s, 1))
        return r
    from strata.engine.llm import LLM
    t = time.perf_counter()
    llm = LLM(path, **{**ENGINE, **kw})
    load_s = time.perf_counter() - t
    try:
        llm.generate(_prompts(8, 64, seed=99), None, use_tqdm=False)  # warm-up, no prefix-cache hits later
        r = _throughput(lambda p, s: llm.generate(p, s, use_tqdm=False), records, label)
        r.update(load_s=round(load_s, 1), memory=_memory(llm.engine))
        return r
    finally:
        _close(llm.engine)


def child_combo(path, layout, ctx, n_out, records, label, extra=None):
    """Batch-1 latency, then a throughput run, on one engine (one load for both)."""
    from strata.engine.llm import LLM
    t = time.perf_counter()
    llm = LLM(path, **{**ENGINE, **layout, **(extra or {})})
    load_s = time.perf_counter() - t
    try:
        lat = _latency(llm.engine, ctx, n_out)
        thr = _throughput(lambda p, s: llm.generate(p, s, use_tqdm=False), records, label)
        return {"latency": lat, "throughput": thr, "load_s": round(load_s, 1), "memory": _memory(llm.engine)}
    finally:
        _close(llm.engine)


def child_main(spec: dict) -> dict:
    kind = spec.pop("kind")
    os.environ.update(spec.pop("env", None) or {})  # before the engine: spawned ranks inherit it
    if spec.get("tokenizer"):
        ENGINE["tokenizer"] = spec["tokenizer"]
    if spec.pop("async_steps", False):
        ENGINE["async_scheduling"] = True
    spec.pop("tokenizer", None)
    if spec.pop("quick", False):  # fewer CUDA graphs to capture
        ENGINE["max_num_seqs"] = 64
    if spec.pop("dry", False):
        ENGINE.update(device="cpu", dtype="float32", num_threads=1, num_gpu_blocks_override=512, max_model_len=2048,
                      max_num_batched_tokens=2048)
        spec.pop("dtype", None) if kind == "parity" else None
        if kind == "parity":
            spec["dtype"] = "float32"
    if "records_file" in spec:
        with open(spec.pop("records_file")) as f:
            spec["records"] = json.load(f)[: spec.pop("limit", None)]
    return {"parity": child_parity, "latency": child_latency, "throughput": child_throughput,
            "combo": child_combo}[kind](**spec)


# ------------------------------------------------------------------------------------------ parent side
TOKENIZER: str | None = None
QUICK = False


ASYNC = False


def run_child(spec: dict, timeout: int = 1800) -> dict:
    """One case in a fresh process. A hung child is killed after `timeout` s; with STRATA_HANG_DUMP_S every rank
    prints its Python stacks first, and the tail of its output is kept in the result."""
    spec = {**spec, "tokenizer": TOKENIZER, "quick": QUICK, "dry": DRY, "async_steps": ASYNC}
    label = json.dumps({k: v for k, v in spec.items() if k not in ("records_file",)})[:200]
    log(f"== {label}")
    t = time.perf_counter()
    env = {**os.environ, "STRATA_HANG_DUMP_S": os.environ.get("STRATA_HANG_DUMP_S", "300")}
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        log(err[-6000:])
        return {"error": f"timed out after {timeout}s", "stderr_tail": err[-6000:]}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        log(err[-4000:])
        return {"error": f"exit {p.returncode}", "stderr_tail": err[-4000:]}
    r = json.loads(lines[-1])
    r["wall_s"] = round(time.perf_counter() - t, 1)
    log(f"   -> {json.dumps({k: v for k, v in r.items() if k not in ('tokens', 'logprobs')})[:600]}")
    return r


def case_smoke(base, args):
    """tests/parallel_support/gpu_check.py: tiny float32 model, TP=2 / PP=2 eager, then with CUDA graphs."""
    if DRY:
        return {"case": "smoke", "status": "skipped (dry run: needs CUDA)"}, []
    env = {**os.environ, "STRATA_HANG_DUMP_S": "120", "PYTHONPATH": ROOT + os.pathsep + os.path.join(ROOT, "src")}
    cmd = [sys.executable, "-m", "tests.parallel_support.gpu_check"] + (["--tokenizer", TOKENIZER] if TOKENIZER else [])
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=args.smoke_timeout)
        status = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        status = "timeout"
    log(out[-3000:])
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    res = {"case": "smoke", "status": status, "steps": out.splitlines()[-12:]}
    if lines:
        res["results"] = json.loads(lines[-1])
    else:
        res["stderr_tail"] = err[-6000:]
    return res, []


def layout_name(layout: dict) -> str:
    return f"tp{layout.get('tensor_parallel_size', 1)}_pp{layout.get('pipeline_parallel_size', 1)}"


def divergence_margin(ref: dict, got: dict, seq: int, k: int) -> dict:
    """At the first position where two runs' greedy tokens differ: how far apart the two tokens' logprobs were in
    each run (a near-tie is a margin of the order of the dtype's rounding), from each run's top-5."""
    a, b = ref["tokens"][seq][k], got["tokens"][seq][k]
    out = {"seq": seq, "pos": k, "ref_token": a, "other_token": b}
    for name, run in (("ref", ref), ("other", got)):
        top = run.get("logprobs", [[]] * (seq + 1))[seq][k] if run.get("logprobs") else {}
        la, lb = top.get(str(a)), top.get(str(b))
        out[f"{name}_margin"] = round(abs(la - lb), 5) if la is not None and lb is not None else None
        out[f"{name}_top1_top2_gap"] = (round(sorted(top.values())[-1] - sorted(top.values())[-2], 5)
                                        if len(top) >= 2 else None)
    return out


def case_parity(base, args):
    d = checkpoint_dir("qwen3-4b", base)  # bf16 on disk; the float32 runs upcast the same weights exactly
    n_tok = 16 if QUICK else 64
    extra = {"load_format": "auto", "max_num_seqs": 16}
    res = {}
    layouts = {"tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2},
               # one GPU, the torch twins of every kernel instead of Triton (eager: the twins are not graph-safe)
               "torch": {"enforce_eager": True, "env": {"STRATA_DISABLE_TRITON": "1"}}}
    for dtype in args.parity_dtypes.split(","):
        ref = run_child({"kind": "parity", "path": d, "layout": {}, "dtype": dtype, "n_tok": n_tok, "extra": extra})
        for lname in args.parity_layouts.split(","):
            lay = dict(layouts[lname])
            env = lay.pop("env", None)
            name = "torch_backend" if lname == "torch" else layout_name(lay)
            got = run_child({"kind": "parity", "path": d, "layout": lay, "dtype": dtype, "n_tok": n_tok,
                             "extra": extra, "env": env})
            if "tokens" not in got or "tokens" not in ref:
                res[f"{dtype}_{name}"] = {"error": got.get("error") or ref.get("error")}
                continue
            equal = [a == b for a, b in zip(got["tokens"], ref["tokens"])]
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                     for a, b in zip(got["tokens"], ref["tokens"])]
            res[f"{dtype}_{name}"] = {"sequences_equal": sum(equal), "of": len(equal), "first_divergence": first,
                                      "margins": [divergence_margin(ref, got, i, k) for i, k in enumerate(first)
                                                  if k is not None]}
    return {"case": "parity", "model": "qwen3-4b (random weights, safetensors)", "tokens_per_sequence": n_tok,
            "results": res}, []


def case_latency8b(base, args):
    d = model_dir("llama-3-8b", base)
    ctx, n_out = (256, 32) if QUICK else (1024, 128)
    res, runs = {}, []
    variants = [("tp1", {}, {}), ("tp2", {"tensor_parallel_size": 2}, {}),
                ("tp2_symm_mem", {"tensor_parallel_size": 2}, {"env": {"STRATA_TP_ALLREDUCE": "symm_mem"}})]
    if args.full:
        variants += [("tp1_eager", {}, {"enforce_eager": True}),
                     ("tp2_eager", {"tensor_parallel_size": 2}, {"enforce_eager": True})]
    for name, lay, extra in variants:
        env = extra.pop("env", None)
        r = run_child({"kind": "latency", "path": d, "layout": lay, "ctx": ctx, "n_out": n_out,
                       "extra": {"max_num_seqs": 8, **extra}, "env": env})  # batch 1: a short graph ladder
        res[name] = r
        if "tpot_ms" in r:
            runs.append({"model": "llama-3-8b", "workload": "random", "prompt_len": ctx, "output_len": n_out,
                         "concurrency": 1, "tp": lay.get("tensor_parallel_size", 1), "pp": 1, "dp": 1,
                         "tpot_ms": r["tpot_ms"], "ttft_ms": r["ttft_ms"], "variant": name})
    for v in ("tp2", "tp2_symm_mem"):
        if "tpot_ms" in res["tp1"] and "tpot_ms" in res.get(v, {}):
            res[f"{v}_over_tp1"] = round(res[v]["tpot_ms"] / res["tp1"]["tpot_ms"], 3)
    res["target_met"] = min(res.get("tp2_over_tp1", 9), res.get("tp2_symm_mem_over_tp1", 9)) <= 0.7
    return {"case": "latency8b", "model": "llama-3-8b", "results": res}, runs


def case_sharegpt(base, args, variants=("dp1", "dp2", "tp2", "pp2")):
    d = model_dir("qwen3-4b", base)
    wdir = find_workloads(args.workloads)
    if wdir is None:
        return {"case": "sharegpt", "error": "sharegpt1000.json not found (pass --workloads DIR)"}, []
    spec = {"records_file": os.path.join(wdir, "sharegpt1000.json"), "label": "sharegpt1000"}
    if QUICK:
        spec["limit"] = 16 if DRY else 100
    res, runs = {}, []
    layouts = {"dp1": ({}, 1), "dp2": ({}, 2), "tp2": ({"tensor_parallel_size": 2}, 1),
               "pp2": ({"pipeline_parallel_size": 2}, 1)}
    for name in variants:
        lay, dp = layouts[name]
        r = run_child({"kind": "throughput", "path": d, "layout": lay, "dp": dp, **spec})
        res[name] = r
        if "output_tok_s" in r:
            runs.append({"model": "qwen3-4b", "workload": "sharegpt1000", "tp": lay.get("tensor_parallel_size", 1),
                         "pp": lay.get("pipeline_parallel_size", 1), "dp": dp, "output_tok_s": r["output_tok_s"],
                         "variant": name})
    if "output_tok_s" in res.get("dp1", {}) and "output_tok_s" in res.get("dp2", {}):
        res["dp2_over_dp1"] = round(res["dp2"]["output_tok_s"] / res["dp1"]["output_tok_s"], 3)
        res["target_met"] = res["dp2_over_dp1"] >= 1.9
    return {"case": "sharegpt", "model": "qwen3-4b", "results": res}, runs


def case_sharegpt_dp(base, args):
    r, runs = case_sharegpt(base, args, ("dp1", "dp2"))
    r["case"] = "sharegpt_dp"
    return r, runs


def case_sharegpt_mp(base, args):
    r, runs = case_sharegpt(base, args, tuple(args.sharegpt_mp.split(",")))
    r["case"] = "sharegpt_mp"
    return r, runs


def case_big70b(base, args):
    d = model_dir("llama-3-70b", base)
    n, plen, olen = (32, 256, 32) if QUICK else (256, 512, 128)
    wl = os.path.join(base, f"random_{n}_{plen}_{olen}.json")
    with open(wl, "w") as f:
        json.dump([{"prompt_ids": p, "output_len": olen} for p in _prompts(n, plen, seed=7)], f)
    ctx, n_out = (256, 16) if QUICK else (1024, 64)
    res, runs = {}, []
    for lay in ({"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}):
        name = layout_name(lay)
        r = run_child({"kind": "combo", "path": d, "layout": lay, "ctx": ctx, "n_out": n_out, "records_file": wl,
                       "label": f"random{plen}/{olen}x{n}"})
        res[name] = r
        common = {"model": "llama-3-70b", "workload": "random", "tp": lay.get("tensor_parallel_size", 1),
                  "pp": lay.get("pipeline_parallel_size", 1), "dp": 1}
        lat, thr = r.get("latency", {}), r.get("throughput", {})
        if "tpot_ms" in lat:
            runs.append({**common, "prompt_len": lat["context"], "output_len": lat["output"], "concurrency": 1,
                         "tpot_ms": lat["tpot_ms"], "ttft_ms": lat["ttft_ms"]})
        if "output_tok_s" in thr:
            runs.append({**common, "prompt_len": plen, "output_len": olen, "concurrency": n,
                         "output_tok_s": thr["output_tok_s"]})
    return {"case": "big70b", "model": "llama-3-70b", "results": res}, runs


def case_overlap(base, args):
    d = model_dir("llama-3-8b", base)
    n, plen = (8, 1024) if QUICK else (32, 2048)
    wl = os.path.join(base, f"prefill_{n}_{plen}.json")
    with open(wl, "w") as f:
        json.dump([{"prompt_ids": p, "output_len": 1} for p in _prompts(n, plen, seed=11)], f)
    res = {}
    for name, on in (("off", False), ("on", True)):
        res[name] = run_child({"kind": "combo", "path": d, "layout": {"tensor_parallel_size": 2},
                               "ctx": 1024 if not QUICK else 256, "n_out": 64 if not QUICK else 16,
                               "records_file": wl, "label": f"prefill {n}x{plen}",
                               "extra": {"tp_comm_overlap": on, "max_num_seqs": 32}})
    try:
        res["prefill_speedup"] = round(res["on"]["throughput"]["total_tok_s"] /
                                       res["off"]["throughput"]["total_tok_s"], 3)
        res["tpot_on_over_off"] = round(res["on"]["latency"]["tpot_ms"] / res["off"]["latency"]["tpot_ms"], 3)
    except (KeyError, ZeroDivisionError):
        pass
    return {"case": "overlap", "model": "llama-3-8b", "results": res}, []


def case_moe(base, args):
    """Qwen3-30B-A3B arch on 2 GPUs: experts TP-sharded (TP=2) against expert-parallel (TP=2 + EP), one GPU
    as the baseline; batch-1 latency and a 256-request random 512/128 throughput run, memory per GPU."""
    d = model_dir("qwen3-30b-a3b", base)
    n, plen, olen = (32, 256, 32) if QUICK else (256, 512, 128)
    wl = os.path.join(base, f"moe_{n}_{plen}_{olen}.json")
    with open(wl, "w") as f:
        json.dump([{"prompt_ids": p, "output_len": olen} for p in _prompts(n, plen, seed=5)], f)
    res = {}
    for name, lay in (("tp1", {}), ("tp2_experts_sharded", {"tensor_parallel_size": 2}),
                      ("tp2_ep", {"tensor_parallel_size": 2, "enable_expert_parallel": True})):
        res[name] = run_child({"kind": "combo", "path": d, "layout": lay, "ctx": 1024 if not QUICK else 256,
                               "n_out": 64 if not QUICK else 16, "records_file": wl,
                               "label": f"random{plen}/{olen}x{n}"})
    return {"case": "moe", "model": "qwen3-30b-a3b", "results": res}, []


CASES = {"smoke": case_smoke, "parity": case_parity, "latency8b": case_latency8b, "sharegpt": case_sharegpt,
         "sharegpt_dp": case_sharegpt_dp, "sharegpt_mp": case_sharegpt_mp, "big70b": case_big70b, "overlap": case_overlap,
         "moe": case_moe}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--workloads", default=None, help="directory holding sharegpt1000.json")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="small workloads: a smoke run of this script")
    ap.add_argument("--full", action="store_true", help="also the eager variants of latency8b")
    ap.add_argument("--async-steps", action="store_true",
                    help="--async-scheduling in every engine (PP engines still step synchronously)")
    ap.add_argument("--parity-dtypes", default="float32,bfloat16")
    ap.add_argument("--parity-layouts", default="tp2,pp2", help="any of tp2, pp2, torch (one GPU, torch twins)")
    ap.add_argument("--sharegpt-mp", default="tp2,pp2", help="layouts of the sharegpt_mp case")
    ap.add_argument("--smoke-timeout", type=int, default=600, help="seconds before the smoke case is killed")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: .carry/tok if present, else "
                                                      "the embedded SmolLM2 tokenizer)")
    ap.add_argument("--dry-run", action="store_true", help="run the script on CPU with tiny models (no figures)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))), flush=True)
        return 0
    import torch
    global TOKENIZER, QUICK, DRY, ASYNC
    DRY = args.dry_run
    ASYNC = args.async_steps
    QUICK = args.quick or DRY
    TOKENIZER = args.tokenizer or (os.path.join(ROOT, ".carry", "tok")
                                   if os.path.isdir(os.path.join(ROOT, ".carry", "tok")) else None)
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus": torch.cuda.device_count(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "quick": QUICK,
            "async_steps": ASYNC}
    base = tempfile.mkdtemp(prefix="strata-parallel-gpu-")
    all_runs = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        t = time.perf_counter()
        result, runs = CASES[name](base, args)
        result.update(meta, case_seconds=round(time.perf_counter() - t, 1))
        with open(os.path.join(args.out, f"parallel_gpu-{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        all_runs += [{**meta, **r} for r in runs]
        with open(os.path.join(args.out, "parallel_gpu.json"), "w") as f:
            json.dump({"runs": all_runs}, f, indent=1)
        log(f"== {name} done in {result['case_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
