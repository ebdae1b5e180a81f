"""Kernel micro-benchmarks against ceilings measured in the same run, plus a parity sweep at real sizes.

    python benchmarks/kernels.py --out benchmarks/results/kernels-<gpu>-<date>.json [--quick] [--no-sweep]

On a CUDA GPU it measures
  * the ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 GEMM 8192^3 TFLOP/s;
  * every Triton kernel at the reference model's sizes (Qwen3-4B: 32 q heads, 8 kv heads, head_dim 128,
    hidden 2560, intermediate 9728, bf16, block_size 16): achieved GB/s (memory-bound kernels) or TFLOP/s
    (prefill attention) and the fraction of the matching ceiling; the torch twin's time beside it;
  * a config sweep of paged decode attention (split-KV factor, tile, warps, stages) at batch 64 x 2k;
  * parity of every kernel against its twin at those sizes (relative Frobenius error, max abs error).
Times are triton.testing.do_bench medians (L2 flushed before each call). Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

BLOCK_SIZE = 16
H, KVH, D = 32, 8, 128
HIDDEN, INTER = 2560, 9728
DT = torch.bfloat16
TOKENS = 8192  # rows of the token-wise kernels (a large prefill step)
DEVICE = "cuda"  # module-level so a CPU smoke run can point it elsewhere


# ------------------------------------------------------------------------------------------------ helpers

def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench."""
    from triton.testing import do_bench
    try:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # a triton without return_mode
        return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5]))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o, r = out.float(), ref.float()
    return float((o - r).norm() / r.norm().clamp_min(1e-30)), float((o - r).abs().max())


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def paged_cache(lens: list[int], dtype=DT, spare: int = 0):
    """K/V caches holding exactly the blocks `lens` needs (+ spare), pages shuffled across sequences."""
    need = [math.ceil(n / BLOCK_SIZE) for n in lens]
    nb = sum(need) + spare + 1
    k = torch.randn(nb, BLOCK_SIZE, KVH, D, dtype=dtype, device=DEVICE)
    v = torch.randn(nb, BLOCK_SIZE, KVH, D, dtype=dtype, device=DEVICE)
    perm = torch.randperm(nb, device="cpu")
    bt = torch.zeros(len(lens), max(need), dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[at:at + n].to(torch.int32)
        at += n
    return k, v, bt.to(DEVICE)


# ------------------------------------------------------------------------------------------------ ceilings

def measure_ceilings(quick: bool) -> dict:
    n = (1 << 28) if quick else (1 << 29)  # bytes per buffer: 256 MiB / 512 MiB (far beyond L2)
    src = torch.empty(n // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * n / (t * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=DT, device=DEVICE)
    b = torch.randn(m, m, dtype=DT, device=DEVICE)
    t = bench_ms(lambda: torch.matmul(a, b))
    tflops = 2 * m ** 3 / (t * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "copy_bytes_per_buffer": n, "gemm_bf16_8192_TFLOPs": tflops}


# ------------------------------------------------------------------------------------------------ cases

def decode_case(B: int, ctx: int):
    lens_list = [ctx] * B
    k, v, bt = paged_cache(lens_list)
    q = torch.randn(B, H, D, dtype=DT, device=DEVICE)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    kv_bytes = 2 * sum(lens_list) * KVH * D * k.element_size()
    nbytes = kv_bytes + 2 * q.numel() * q.element_size() + bt.numel() * 4 + lens.numel() * 4
    args = (q, k, v, bt, lens, D ** -0.5, ctx)
    return args, nbytes


def prefill_case(B: int, q_len: int, prefix: int):
    L = prefix + q_len
    k, v, bt = paged_cache([L] * B)
    T = B * q_len
    q = torch.randn(T, H, D, dtype=DT, device=DEVICE)
    qsl = torch.arange(0, T + 1, q_len, dtype=torch.int32, device=DEVICE)
    lens = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
    pairs = B * (q_len * prefix + q_len * (q_len + 1) // 2)  # visible (query, key) pairs
    flops = 4 * H * D * pairs  # QK^T and PV, 2 flops per multiply-add each
    return (q, k, v, bt, qsl, lens, D ** -0.5), flops


def run_kernels(tk, ref, ceil: dict, quick: bool) -> list[dict]:
    rows = []
    bw, peak = ceil["copy_GBps"], ceil["gemm_bf16_8192_TFLOPs"]

    def mem_row(name, shape, fn, twin, nbytes, extra=None):
        t = bench_ms(fn)
        t_twin = bench_ms(twin) if twin is not None else None
        gbs = nbytes / (t * 1e-3) / 1e9
        row = {"kernel": name, "shape": shape, "ms": t, "GBps": gbs, "fraction_of_copy_bw": gbs / bw,
               "bytes": nbytes, "twin_ms": t_twin}
        row.update(extra or {})
        rows.append(row)
        print(f"  {name:<26} {shape:<34} {t * 1e3:9.1f} us {gbs:8.0f} GB/s  {100 * gbs / bw:5.1f}% of copy"
              + (f"   twin {t_twin * 1e3:9.1f} us" if t_twin is not None else ""), flush=True)

    def flop_row(name, shape, fn, twin, flops):
        t = bench_ms(fn)
        t_twin = bench_ms(twin) if twin is not None else None
        tf = flops / (t * 1e-3) / 1e12
        rows.append({"kernel": name, "shape": shape, "ms": t, "TFLOPs": tf, "fraction_of_gemm_peak": tf / peak,
                     "flops": flops, "twin_ms": t_twin})
        print(f"  {name:<26} {shape:<34} {t * 1e3:9.1f} us {tf:8.1f} TFLOP/s {100 * tf / peak:5.1f}% of GEMM"
              + (f"   twin {t_twin * 1e3:9.1f} us" if t_twin is not None else ""), flush=True)

    # paged decode attention: the target shape first, then latency / long-context / big-batch shapes
    decode_shapes = [(64, 2048), (1, 1024)] if quick else [(64, 2048), (1, 1024), (8, 4096), (256, 1024),
                                                           (32, 8192)]
    for B, ctx in decode_shapes:
        args, nbytes = decode_case(B, ctx)
        part = tk.decode_attention.choose_num_splits(B, KVH, args[0].device, ctx)
        twin = (lambda a=args: ref.paged_decode_attention(*a)) if B * ctx <= 64 * 2048 else None
        mem_row("paged_decode_attention", f"B={B} ctx={ctx} (splits {part})",
                lambda a=args: tk.paged_decode_attention(*a), twin, nbytes, {"num_splits": part})
        del args
        torch.cuda.empty_cache()

    # paged prefill attention (compute-bound: TFLOP/s against the GEMM ceiling)
    for B, qlen, prefix in [(4, 2048, 0), (8, 512, 1536)] + ([] if quick else [(32, 256, 0), (1, 8192, 0)]):
        args, flops = prefill_case(B, qlen, prefix)
        flop_row("paged_prefill_attention", f"B={B} q={qlen} prefix={prefix}",
                 lambda a=args: tk.paged_prefill_attention(*a), lambda a=args: ref.paged_prefill_attention(*a),
                 flops)
        del args
        torch.cuda.empty_cache()

    T = TOKENS
    x = torch.randn(T, HIDDEN, dtype=DT, device=DEVICE)
    r = torch.randn(T, HIDDEN, dtype=DT, device=DEVICE)
    w = torch.rand(HIDDEN, dtype=DT, device=DEVICE) + 0.5
    e = x.element_size()
    mem_row("rms_norm", f"T={T} hidden={HIDDEN}", lambda: tk.rms_norm(x, w, 1e-6), lambda: ref.rms_norm(x, w, 1e-6),
            2 * T * HIDDEN * e + HIDDEN * e)
    mem_row("fused_add_rms_norm", f"T={T} hidden={HIDDEN}", lambda: tk.fused_add_rms_norm(x, r, w, 1e-6),
            lambda: ref.fused_add_rms_norm(x, r, w, 1e-6), 4 * T * HIDDEN * e + HIDDEN * e)
    # decode-sized rows too (launch-bound; shows the floor)
    xs, rs = x[:64], r[:64]
    mem_row("fused_add_rms_norm", f"T=64 hidden={HIDDEN}", lambda: tk.fused_add_rms_norm(xs, rs, w, 1e-6),
            lambda: ref.fused_add_rms_norm(xs, rs, w, 1e-6), 4 * 64 * HIDDEN * e + HIDDEN * e)
    del x, r

    qkv = torch.randn(T, (H + 2 * KVH) * D, dtype=DT, device=DEVICE)
    q, k = qkv[:, :H * D], qkv[:, H * D:(H + KVH) * D]
    pos = torch.randint(0, 4096, (T,), device=DEVICE)
    cs = torch.randn(40960, D, dtype=torch.float32, device=DEVICE)
    mem_row("rotary_embedding", f"T={T} q={H}x{D} k={KVH}x{D}", lambda: tk.rotary_embedding(pos, q, k, cs, D),
            lambda: ref.rotary_embedding(pos, q, k, cs, D),
            2 * T * (H + KVH) * D * e + T * D * 4 + T * 8)
    del qkv, q, k

    g = torch.randn(T, 2 * INTER, dtype=DT, device=DEVICE)
    mem_row("silu_and_mul", f"T={T} inter={INTER}", lambda: tk.silu_and_mul(g), lambda: ref.silu_and_mul(g),
            3 * T * INTER * e)
    del g

    key = torch.randn(T, KVH, D, dtype=DT, device=DEVICE)
    val = torch.randn(T, KVH, D, dtype=DT, device=DEVICE)
    nb = T // BLOCK_SIZE * 2
    kc = torch.empty(nb, BLOCK_SIZE, KVH, D, dtype=DT, device=DEVICE)
    vc = torch.empty_like(kc)
    slots = torch.randperm(nb * BLOCK_SIZE, device=DEVICE)[:T]
    mem_row("reshape_and_cache", f"T={T} kv={KVH}x{D}", lambda: tk.reshape_and_cache(key, val, kc, vc, slots),
            lambda: ref.reshape_and_cache(key, val, kc, vc, slots), 4 * T * KVH * D * e + T * 8)
    del key, val, kc, vc

    # the fused attention-input epilogue (q/k norm + rotary + cache write) against the unfused Triton kernels
    # it replaces ("twin" column here: the unfused composition), at decode (launch-bound) and prefill sizes
    from strata import ops as dispatch
    for n in (1, 64, T):
        qkv = torch.randn(n, (H + 2 * KVH) * D, dtype=DT, device=DEVICE)
        p_ = torch.randint(0, 4096, (n,), device=DEVICE)
        nbk = max(2, n // BLOCK_SIZE * 2)
        kc = torch.empty(nbk, BLOCK_SIZE, KVH, D, dtype=DT, device=DEVICE)
        vc = torch.empty_like(kc)
        sl = torch.randperm(nbk * BLOCK_SIZE, device=DEVICE)[:n]
        wn = torch.rand(D, dtype=DT, device=DEVICE) + 0.5
        a = (qkv, p_, cs, wn, wn, 1e-6, kc, vc, sl, H, KVH, D)
        mem_row("qkv_epilogue (fused)", f"T={n} q={H}x{D} kv={KVH}x{D}", lambda a=a: tk.qkv_epilogue(*a),
                lambda a=a: ref.qkv_epilogue(*a, ops=dispatch), n * (H + 2 * KVH) * D * e * 2 + n * D * 4)
        del qkv, kc, vc
    torch.cuda.empty_cache()
    return rows


def decode_sweep(tk, ceil: dict, quick: bool) -> list[dict]:
    """Every (num_splits, tile, warps, stages) config of decode attention at batch 64 x 2k context."""
    B, ctx = 64, 2048
    args, nbytes = decode_case(B, ctx)
    out = []
    parts = [1, 2, 4, 8] if quick else [1, 2, 3, 4, 6, 8]
    tiles = [64] if quick else [32, 64, 128]
    warps = [4] if quick else [4, 8]
    stages = [2, 3] if quick else [1, 2, 3]
    for p in parts:
        for t in tiles:
            for w in warps:
                for s in stages:
                    fn = lambda: tk.paged_decode_attention(*args, num_splits=p, tile=t, num_warps=w,
                                                           num_stages=s)
                    try:
                        fn()
                        torch.cuda.synchronize()
                        ms = bench_ms(fn, warmup=10, rep=50)
                    except Exception as exc:  # e.g. out of shared memory for a big tile x stages
                        out.append({"num_splits": p, "tile": t, "num_warps": w, "num_stages": s,
                                    "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    out.append({"num_splits": p, "tile": t, "num_warps": w, "num_stages": s, "ms": ms,
                                "GBps": gbs, "fraction_of_copy_bw": gbs / ceil["copy_GBps"]})
    ok = sorted((r for r in out if "ms" in r), key=lambda r: r["ms"])
    print(f"  decode sweep B={B} ctx={ctx}: {len(ok)} configs ran; best 5:")
    for r in ok[:5]:
        print(f"    splits {r['num_splits']:>2} tile {r['tile']:>4} warps {r['num_warps']} stages "
              f"{r['num_stages']}: {r['ms'] * 1e3:7.1f} us {r['GBps']:7.0f} GB/s "
              f"{100 * r['fraction_of_copy_bw']:5.1f}%")
    bad = [r for r in out if "error" in r]
    if bad:
        print(f"  {len(bad)} configs failed, e.g. {bad[0]}")
    return out


def parity(tk, ref) -> list[dict]:
    """Each kernel vs its twin at real sizes on the GPU; bf16 inputs, twin computed the same way."""
    res = []

    def add(name, shape, out, exp, tol):
        re_, mx = rel_err(out, exp)
        res.append({"kernel": name, "shape": shape, "rel_err": re_, "max_abs_err": mx, "tol": tol,
                    "ok": bool(re_ <= tol)})
        print(f"  {name:<26} {shape:<34} rel {re_:.2e} max {mx:.2e} {'ok' if re_ <= tol else 'FAIL'}")

    torch.manual_seed(0)
    for B, ctx, part in [(64, 2048, None), (64, 2048, 1), (7, 3000, 5), (3, 17, None)]:
        args, _ = decode_case(B, ctx)
        B, ctx = args[0].shape[0], args[6]
        lens = torch.randint(1, ctx + 1, (B,), dtype=torch.int32, device=DEVICE)  # ragged
        lens[0] = ctx
        a = args[:4] + (lens, args[5], ctx)
        add("paged_decode_attention", f"B={B} ctx<={ctx} splits={part}",
            tk.paged_decode_attention(*a, num_splits=part), ref.paged_decode_attention(*a), 2e-2)
    for dt in (torch.float32,):
        args, _ = decode_case(5, 700)
        a = tuple(x.to(dt) if torch.is_tensor(x) and x.is_floating_point() else x for x in args)
        add("paged_decode_attention", "fp32 B=5 ctx=700", tk.paged_decode_attention(*a),
            ref.paged_decode_attention(*a), 1e-4)
    for B, qlen, prefix in [(4, 2048, 0), (8, 512, 1536), (3, 37, 100)]:
        args, _ = prefill_case(B, qlen, prefix)
        add("paged_prefill_attention", f"B={B} q={qlen} prefix={prefix}", tk.paged_prefill_attention(*args),
            ref.paged_prefill_attention(*args), 2e-2)
    T = TOKENS // 2
    x = torch.randn(T, HIDDEN, dtype=DT, device=DEVICE)
    r = torch.randn(T, HIDDEN, dtype=DT, device=DEVICE)
    w = torch.rand(HIDDEN, dtype=DT, device=DEVICE) + 0.5
    add("rms_norm", f"T={T}", tk.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), 1e-2)
    o1, r1 = tk.fused_add_rms_norm(x, r, w, 1e-6)
    o2, r2 = ref.fused_add_rms_norm(x, r, w, 1e-6)
    add("fused_add_rms_norm", f"T={T} out", o1, o2, 1e-2)
    add("fused_add_rms_norm", f"T={T} residual", r1, r2, 1e-2)
    qkv = torch.randn(T, (H + 2 * KVH) * D, dtype=DT, device=DEVICE)
    q, k = qkv[:, :H * D], qkv[:, H * D:(H + KVH) * D]
    pos = torch.randint(0, 4096, (T,), device=DEVICE)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32, device=DEVICE) / D))
    f = torch.outer(torch.arange(4096, dtype=torch.float32, device=DEVICE), inv)
    cs = torch.cat((f.cos(), f.sin()), dim=-1)
    (tq, tk_), (eq, ek) = tk.rotary_embedding(pos, q, k, cs, D), ref.rotary_embedding(pos, q, k, cs, D)
    add("rotary_embedding", f"T={T} q", tq, eq, 1e-2)
    add("rotary_embedding", f"T={T} k", tk_, ek, 1e-2)
    g = torch.randn(T, 2 * INTER, dtype=DT, device=DEVICE)
    add("silu_and_mul", f"T={T}", tk.silu_and_mul(g), ref.silu_and_mul(g), 1e-2)
    key = torch.randn(T, KVH, D, dtype=DT, device=DEVICE)
    nb = T // BLOCK_SIZE * 2
    kc = torch.randn(nb, BLOCK_SIZE, KVH, D, dtype=DT, device=DEVICE)
    slots = torch.randperm(nb * BLOCK_SIZE, device=DEVICE)[:T]
    slots[::7] = -1
    k1, v1, k2, v2 = kc.clone(), kc.clone(), kc.clone(), kc.clone()
    tk.reshape_and_cache(key, key, k1, v1, slots)
    ref.reshape_and_cache(key, key, k2, v2, slots)
    add("reshape_and_cache", f"T={T}", torch.cat([k1, v1]), torch.cat([k2, v2]), 0.0)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="strata kernel micro-benchmarks (CUDA only)")
    ap.add_argument("--out", help="write the JSON results here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and sweep points")
    ap.add_argument("--no-sweep", action="store_true", help="skip the decode config sweep")
    ap.add_argument("--no-parity", action="store_true", help="skip the parity sweep")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device here; these are GPU kernel benchmarks, nothing was measured. "
              "On CPU, check the kernels with `TRITON_INTERPRET=1 pytest tests/test_ops_triton.py` instead.",
              file=sys.stderr)
        return 2
    try:
        import triton
        from strata.ops import ref
        from strata.ops import triton_kernels as tk
    except Exception as e:
        print(f"benchmarks/kernels.py: triton kernels do not import: {e!r}", file=sys.stderr)
        return 2

    t_start = time.time()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}, commit {git_commit()[:12]}")
    ceil = measure_ceilings(a.quick)
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read+write), bf16 GEMM 8192^3 "
          f"{ceil['gemm_bf16_8192_TFLOPs']:.0f} TFLOP/s")
    print("kernels (do_bench median):")
    rows = run_kernels(tk, ref, ceil, a.quick)
    sweep = [] if a.no_sweep else decode_sweep(tk, ceil, a.quick)
    print("parity vs twins (relative Frobenius error):")
    par = [] if a.no_parity else parity(tk, ref)
    target = next(r for r in rows if r["kernel"] == "paged_decode_attention")
    ok_sweep = sorted((r for r in sweep if "ms" in r), key=lambda r: r["ms"])
    best = ok_sweep[0] if ok_sweep else None
    print(f"decode attention B=64 x 2k, default config: {100 * target['fraction_of_copy_bw']:.1f}% of copy "
          f"bandwidth (target >= 75%)"
          + (f"; best swept config {100 * best['fraction_of_copy_bw']:.1f}% (splits {best['num_splits']}, "
             f"tile {best['tile']}, warps {best['num_warps']}, stages {best['num_stages']})" if best else ""))
    result = {
        "benchmark": "kernels",
        "device": dev,
        "device_count": torch.cuda.device_count(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "model_sizes": {"q_heads": H, "kv_heads": KVH, "head_dim": D, "hidden": HIDDEN, "intermediate": INTER,
                        "dtype": "bfloat16", "block_size": BLOCK_SIZE},
        "timing": "triton.testing.do_bench median (L2 flushed per call)",
        "ceilings": ceil,
        "kernels": rows,
        "decode_sweep": sweep,
        "decode_sweep_best": best,
        "decode_defaults": {"tile": tk.decode_attention.DEFAULT_TILE, "num_warps": tk.decode_attention.DEFAULT_WARPS,
                            "num_stages": tk.decode_attention.DEFAULT_STAGES,
                            "num_splits_at_64x2048": target.get("num_splits")},
        "parity": par,
        "parity_all_ok": all(p["ok"] for p in par),
        "decode_target_fraction": 0.75,
        "decode_target_met": target["fraction_of_copy_bw"] >= 0.75,
        "wall_s": time.time() - t_start,
    }
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.out}")
    return 0 if result["parity_all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
