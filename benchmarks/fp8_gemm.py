"""FP8 dense GEMMs (issue 21) at Qwen3-4B's and Llama-3-8B's linear shapes: the kernels of
`strata.ops.triton_kernels.fp8_gemm` against cuBLAS bf16, with the W8A16 tile sweep that fills its config table.

    python benchmarks/fp8_gemm.py --out fp8_gemm.json            # one H200: under 4 minutes (--budget-s guards it)
    python benchmarks/fp8_gemm.py --smoke --out /tmp/fp8s.json   # CPU, TRITON_INTERPRET=1, tiny shapes, seconds

Per (shape, M) with M in 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, bf16 activations:
  * cublas_bf16: F.linear with a bf16 weight (the bf16 model's GEMM);
  * w8a16: the weight-only kernel over a tile sweep (M <= 256; split-K 1..16), best and default config;
  * w8a8: activation quantisation + torch._scaled_mm (row-wise scales), and the Triton W8A8 kernel on the same
    per-row weights; act_quant alone;
  * block (128 x 128 scales, activations per token and 128 columns): the W8A16 kernel with the best per-row tiles
    (M <= 256), and the W8A8 Triton kernel over a small tile sweep;
  * triton_bf16 (M <= 16): the W8A16 kernel's best two tiles on a bf16 weight (weight_scale None): does it beat
    cuBLAS at small M?
Times: one CUDA graph per candidate holding one call per weight copy (copies rotate so that the weights never sit
in L2, as successive layers do), replayed after a warm-up, CUDA events, median of 5 replays, per call. GB/s: weight
bytes (scales included) per second, against the device-to-device copy bandwidth measured first (1 GiB copied,
read + written bytes, as benchmarks/kernels.py). Every result is checked against the twin `ops.ref.fp8_linear` in
the matching regime (weight-only for W8A16, quantised activations for W8A8): max |got - twin| / max |twin|; a
candidate above 2e-2 is reported and never chosen. Prints per shape a table, then the best W8A16 tiles per
(shape, M) as `W8A16_CONFIGS` (and the block kernel's as `W8A8_CONFIGS`) to paste into fp8_gemm.py, and the M
from which W8A8 beats W8A16 per shape (for `ref.FP8_W8A16_MAX_M`). JSON: every row, the tables, the copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

SHAPES = [  # (model, linear, N, K)
    ("qwen3-4b", "qkv", 6144, 2560), ("qwen3-4b", "o", 2560, 4096), ("qwen3-4b", "gate_up", 19456, 2560),
    ("qwen3-4b", "down", 2560, 9728), ("llama-3-8b", "qkv", 6144, 4096), ("llama-3-8b", "o", 4096, 4096),
    ("llama-3-8b", "gate_up", 28672, 4096), ("llama-3-8b", "down", 4096, 14336)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
SMOKE_SHAPES = [("tiny", "down", 64, 160)]  # K = 160: a partial 128-column block
SMOKE_MS = [1, 17, 70]  # CUDA-core tiles, tensor-core tiles, above FP8_W8A16_MAX_M
W8A16_MAX_SWEEP_M = 256
BAD = 2e-2  # max relative error above which a result is wrong (bf16 output rounding is ~4e-3)

# CUDA-core tiles (block_n, block_k, num_warps), block_m 1 (a program per row; M <= 8); tensor-core tiles
# (block_n, block_k, num_warps, num_stages) with block_m 16 / 32 / 64 / 128 (the smallest >= M)
CORE_TILES = [(16, 256, 4), (32, 256, 4), (16, 512, 4), (64, 128, 4), (32, 512, 8), (8, 512, 4)]
DOT_TILES = [(32, 128, 4, 4), (64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 8, 3)]
SPLITS = (1, 2, 4, 8, 16)
BLOCK_TILES = [(64, 128, 128, 8, 4, 3), (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (64, 64, 128, 8, 4, 4)]


def git_commit() -> str:
    if os.environ.get("TREE_COMMIT"):
        return os.environ["TREE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


class Timer:
    """Microseconds per call of fns (one per weight copy): a CUDA graph of all of them, median of 5 timed replays;
    on the CPU (smoke) the wall time of one call of the first."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fns) -> float:
        import torch
        if not self.cuda:  # the interpreter: one call is all the smoke run needs
            t = time.perf_counter()
            fns[0]()
            return (time.perf_counter() - t) * 1e6
        for f in fns:  # compiles, and allocations outside the graph
            f()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        g.replay()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(5):
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3 / len(fns))
        del g
        return sorted(ts)[2]


def copy_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB: (read + written bytes) / time, GB/s (CUDA events, median of 5)."""
    import torch
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / sorted(ts)[2] / 1e9


def w8a16_candidates(M: int, N: int, K: int, smoke: bool) -> list[tuple]:
    from strata.ops.triton_kernels import fp8_gemm as fg
    default = fg.w8a16_default_config(M, N, K)
    if smoke:
        return [default, (1 if M <= 8 else 16, 16, 32, 2, 4, 1)]
    tiles = []
    if M <= 8:
        tiles += [(1, bn, bk, w, 1) for bn, bk, w in CORE_TILES]
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    tiles += [(bm, bn, bk, w, st) for bn, bk, w, st in DOT_TILES if not (bm == 128 and bk == 256)]  # > 227 KB smem
    out = [default]
    for bm, bn, bk, w, st in tiles:
        for sp in SPLITS:
            if K >= 2 * bk * sp and math.ceil(N / bn) * math.ceil(M / bm) * sp <= 64 * 132:
                out.append((bm, bn, bk, sp, w, st))
    return list(dict.fromkeys(out))


def twin(x, w, s, block, group, weight_only: bool):
    """`ops.ref.fp8_linear` in the regime asked for (its threshold set for the call)."""
    from strata.ops import ref
    keep = ref.FP8_W8A16_MAX_M
    ref.FP8_W8A16_MAX_M = (1 << 40) if weight_only else 0
    try:
        return ref.fp8_linear(x, w, s, block, None, None, group)
    finally:
        ref.FP8_W8A16_MAX_M = keep


def rel_err(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def sweep(timer, cands, run, want, copies) -> list[dict]:
    """[{config, us, err}] for each candidate: checked against `want` once, then timed over the weight copies."""
    out = []
    for cfg in cands:
        try:
            t = time.perf_counter()
            err = rel_err(run(0, cfg), want)
            us = (time.perf_counter() - t) * 1e6 if not timer.cuda else None  # smoke: the checked call's time
            if err <= BAD and us is None:
                us = timer([lambda i=i: run(i, cfg) for i in range(copies)])
            us = us if err <= BAD else None
        except Exception as e:  # a tile the compiler refuses (shared memory, registers): reported, skipped
            out.append({"config": cfg and list(cfg), "error": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        out.append({"config": cfg and list(cfg), "us": us, "err": err})
    return out


def best_of(results: list[dict]) -> dict | None:
    ok = [r for r in results if r.get("us") is not None]
    return min(ok, key=lambda r: r["us"]) if ok else None


def bench_shape(model, part, N, K, ms, device, timer, smoke, copy_gbs, deadline) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from strata.ops.triton_kernels import fp8_gemm as fg
    FP8 = torch.float8_e4m3fn
    g = torch.Generator(device=device).manual_seed(N * 7 + K)  # on the device: the CPU casts to e4m3 slowly
    w0 = (torch.randn(N, K, generator=g, device=device) * 64).clamp(-448, 448).to(FP8)
    s_row = torch.rand(N, generator=g, device=device) * 1e-3 + 1e-4
    s_blk = torch.rand(math.ceil(N / 128), math.ceil(K / 128), generator=g, device=device) * 1e-3 + 1e-4
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)) \
        if device.type == "cuda" else 1 << 20
    n8 = 1 if smoke else max(3, math.ceil(3 * l2 / (N * K)))  # copies: > 3x L2 of weight bytes per graph
    n16 = 1 if smoke else max(3, math.ceil(3 * l2 / (2 * N * K)))
    wq = [w0] + [w0.clone() for _ in range(n8 - 1)]
    wb = [(w0.float() * s_row[:, None]).to(torch.bfloat16)] * 1
    wb += [wb[0].clone() for _ in range(n16 - 1)]
    bytes8 = N * K + 4 * N
    rows = []
    for M in ms:
        over = time.perf_counter() > deadline
        x = (torch.randn(M, K, generator=g, device=device) * 2).to(torch.bfloat16)
        r = {"model": model, "linear": part, "N": N, "K": K, "M": M, "weight_bytes_fp8": bytes8,
             "weight_bytes_bf16": 2 * N * K, "budget_exceeded": over}
        want16 = twin(x, w0, s_row, None, None, True)
        want8 = twin(x, w0, s_row, None, None, False)
        r["cublas_bf16_us"] = timer([lambda i=i: F.linear(x, wb[i]) for i in range(n16)])
        if M <= W8A16_MAX_SWEEP_M:
            cands = w8a16_candidates(M, N, K, smoke)[:1 if over else None]
            res = sweep(timer, cands, lambda i, c: fg.fp8_w8a16_linear(x, wq[i], s_row, None, None, c), want16, n8)
            r["w8a16_default"] = res[0]
            r["w8a16_best"] = best_of(res)
            r["w8a16_sweep"] = res
            r["w8a16_bad"] = [c for c in res if c.get("err", 0) > BAD]
        # W8A8, per-row weights: _scaled_mm (CUDA, bf16) and the Triton kernel
        for key, allow in (("w8a8_scaled_mm", True), ("w8a8_triton", False)):
            res = sweep(timer, [None], lambda i, c, a=allow: fg.fp8_w8a8_linear(x, wq[i], s_row, None, None, None,
                                                                               None, allow_scaled_mm=a), want8, n8)
            r[key] = res[0]
        r["act_quant_us"] = timer([lambda: fg.fp8_quantize_act(x)])
        # block-wise 128 x 128 weights
        wantb16 = twin(x, w0, s_blk, (128, 128), 128, True)
        wantb8 = twin(x, w0, s_blk, (128, 128), 128, False)
        if M <= W8A16_MAX_SWEEP_M and r.get("w8a16_best"):
            cfg = tuple(r["w8a16_best"]["config"])
            res = sweep(timer, [cfg], lambda i, c: fg.fp8_w8a16_linear(x, wq[i], s_blk, (128, 128), None, c),
                        wantb16, n8)
            r["block_w8a16"] = res[0]
        bcands = [fg.w8a8_default_config(M, N, K)]
        bcands = list(dict.fromkeys(bcands + ([] if (smoke or over or M < 16) else
                                              [t for t in BLOCK_TILES if t[0] <= max(64, M)])))
        res = sweep(timer, bcands, lambda i, c: fg.fp8_w8a8_linear(x, wq[i], s_blk, (128, 128), None, None, 128,
                                                                   config=c), wantb8, n8)
        r["block_w8a8_default"], r["block_w8a8_best"], r["block_w8a8_sweep"] = res[0], best_of(res), res
        # the same small-M kernel on bf16 weights, against cuBLAS
        if M <= 16 and r.get("w8a16_sweep"):
            top = sorted((c for c in r["w8a16_sweep"] if c.get("us")), key=lambda c: c["us"])[:2]
            want = F.linear(x.float(), wb[0].float()).to(torch.bfloat16)
            res = sweep(timer, [tuple(c["config"]) for c in top],
                        lambda i, c: fg.fp8_w8a16_linear(x, wb[i], None, None, None, c), want, n16)
            r["triton_bf16_best"] = best_of(res)
        for key, nbytes in (("cublas_bf16_us", 2 * N * K),):
            r["cublas_bf16_GBps"] = nbytes / (r[key] * 1e-6) / 1e9
        if r.get("triton_bf16_best"):
            r["triton_bf16_best"]["GBps"] = 2 * N * K / (r["triton_bf16_best"]["us"] * 1e-6) / 1e9
        if r.get("w8a16_best"):
            r["w8a16_best"]["GBps"] = bytes8 / (r["w8a16_best"]["us"] * 1e-6) / 1e9
        if copy_gbs:
            r["cublas_bf16_frac_copy"] = r["cublas_bf16_GBps"] / copy_gbs
            if r.get("w8a16_best"):
                r["w8a16_best"]["frac_copy"] = r["w8a16_best"]["GBps"] / copy_gbs
        rows.append(r)
        print_row(r)
    return rows


def _us(d: dict | None) -> str:
    if not d:
        return f"{'-':>8}"
    if d.get("us") is None:
        return f"{'BAD' if 'err' in d else 'ERR':>8}"
    return f"{d['us']:8.1f}"


def print_row(r: dict) -> None:
    b = r.get("w8a16_best")
    errs = [d.get("err") for d in (b, r.get("w8a8_scaled_mm"), r.get("block_w8a16"), r.get("block_w8a8_best"))
            if d and d.get("err") is not None]
    cfg = f"{tuple(b['config'])}" if b else ""
    frac = f"{100 * b['frac_copy']:5.1f}%" if b and "frac_copy" in b else "     -"
    print(f"  {r['M']:5d} {r['cublas_bf16_us']:8.1f} {_us(b)} {frac} {cfg:<26} {_us(r.get('w8a16_default'))}"
          f" {_us(r.get('w8a8_scaled_mm'))} {_us(r.get('w8a8_triton'))} {r['act_quant_us']:7.1f}"
          f" {_us(r.get('block_w8a16'))} {_us(r.get('block_w8a8_best'))} {_us(r.get('triton_bf16_best'))}"
          f"  {max(errs) if errs else float('nan'):.1e}{'  (budget: defaults only)' if r['budget_exceeded'] else ''}",
          flush=True)


HEADER = (f"  {'M':>5} {'cuBLAS':>8} {'W8A16':>8} {'%copy':>6} {'best W8A16 tiles':<26} {'default':>8} {'smm-W8A8':>8}"
          f" {'tri-W8A8':>8} {'quant':>7} {'blk-A16':>8} {'blk-A8':>8} {'tri-bf16':>8}  max err   (us per call)")


def tables(rows: list[dict]) -> tuple[str, str, dict]:
    """The pasteable W8A16_CONFIGS / W8A8_CONFIGS and the crossover M per shape (W8A8 faster from there on)."""
    a16, a8, cross = {}, {}, {}
    for r in rows:
        key = (r["N"], r["K"])
        if r.get("w8a16_best") and r["M"] <= 64 and not r["budget_exceeded"]:
            a16.setdefault(key, {})[r["M"]] = tuple(r["w8a16_best"]["config"])
        b8 = r.get("block_w8a8_best")
        if b8 and b8.get("config") and r["M"] >= 16 and not r["budget_exceeded"]:
            a8.setdefault(key, {})[r["M"]] = tuple(b8["config"])
        w16, w8 = r.get("w8a16_best"), r.get("w8a8_scaled_mm")
        if w16 and w8 and w8.get("us") and w8["us"] < w16["us"]:
            cross.setdefault(f"{r['model']} {r['linear']} {r['N']}x{r['K']}", r["M"])

    def fmt(name, t, what):
        lines = [f"{name}: dict[tuple[int, int], dict[int, tuple[int, int, int, int, int, int]]] = {{  # {what}"]
        for k, v in t.items():
            lines.append(f"    {k}: {{{', '.join(f'{m}: {c}' for m, c in sorted(v.items()))}}},")
        return "\n".join(lines + ["}"])
    return (fmt("W8A16_CONFIGS", a16, "(block_m, block_n, block_k, split_k, num_warps, num_stages)"),
            fmt("W8A8_CONFIGS", a8, "(block_m, block_n, block_k, group_m, num_warps, num_stages)"), cross)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON record")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes: the same path in seconds")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="after this many seconds the remaining (shape, M) get default tiles only")
    ap.add_argument("--shapes", default="", help="comma-separated model:linear filters, e.g. qwen3-4b:qkv")
    ap.add_argument("--ms", default="", help="comma-separated M values (default: the issue's list)")
    a = ap.parse_args(argv)
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import triton

    from strata.ops import ref
    device = torch.device("cpu" if a.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --smoke on the CPU)", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    if a.shapes:
        keep = set(a.shapes.split(","))
        shapes = [s for s in shapes if f"{s[0]}:{s[1]}" in keep]
    ms = [int(m) for m in a.ms.split(",")] if a.ms else (SMOKE_MS if a.smoke else MS)
    t0 = time.perf_counter()
    copy_gbs = copy_bandwidth(device) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{name}: copy {copy_gbs or 0:.0f} GB/s (1 GiB, read + written); torch {torch.__version__}, triton "
          f"{triton.__version__}; FP8_W8A16_MAX_M = {ref.FP8_W8A16_MAX_M}", flush=True)
    timer = Timer(device)
    rows = []
    for model, part, N, K in shapes:
        print(f"\n{model} {part}: N={N} K={K}, {N * K / 1e6:.1f} MB fp8\n{HEADER}", flush=True)
        rows += bench_shape(model, part, N, K, ms, device, timer, a.smoke, copy_gbs, t0 + a.budget_s)
    t16, t8, cross = tables(rows)
    print("\n# paste into src/strata/ops/triton_kernels/fp8_gemm.py (measured on " + name + ")\n" + t16 + "\n" + t8)
    print("\nW8A8 (_scaled_mm) faster than the best W8A16 from M =", json.dumps(cross, indent=1),
          "\n(shapes not listed: W8A16 faster at every swept M <= 256)")
    bad = [(r["model"], r["linear"], r["M"]) for r in rows if r.get("w8a16_bad")]
    if bad:
        print(f"W8A16 tiles over the error bound at {bad}")
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(), "device": name,
              "torch": torch.__version__, "triton": triton.__version__, "smoke": a.smoke, "copy_GBps": copy_gbs,
              "FP8_W8A16_MAX_M": ref.FP8_W8A16_MAX_M, "budget_s": a.budget_s,
              "wall_s": round(time.perf_counter() - t0, 1), "w8a16_configs": t16, "w8a8_configs": t8,
              "w8a8_faster_from_M": cross, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{len(rows)} rows in {record['wall_s']} s -> {a.out}")
    wrong = [(r["model"], r["linear"], r["M"], k) for r in rows for k in
             ("w8a16_best", "w8a8_scaled_mm", "w8a8_triton", "block_w8a16", "block_w8a8_best")
             if k in r and (r[k] is None or r[k].get("us") is None)]
    if wrong:
        print(f"WRONG or failed: {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
