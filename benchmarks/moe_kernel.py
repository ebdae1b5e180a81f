"""The fused-MoE kernel at Qwen3-30B-A3B's shapes: time per call inside a CUDA graph, default tiles against a
sweep, and the bandwidth of the experts it reads.

    python benchmarks/moe_kernel.py --out moe_kernel.json [--quick] [--decode-ab]

Why: the MoE model's batch-1 time per token hardly fell with TP on 4 x H200, far above the plan (figures in
docs/PARALLELISM.md, "Four GPUs" and "MoE decode"): a per-layer cost. This measures the kernel alone (alignment
+ two grouped GEMMs + activation) per (tokens, TP width), graph-timed so that launch overhead counts as it does
in the decode graphs. Shapes: 128 experts, top-8, hidden 2048, expert width 768 / TP. Every config's output is
checked against the default's (same tiles up to rounding) before it is timed.

--decode-ab: the alignment-free decode path against the sorted grouped GEMM (default tiles) at 1-16 tokens, and
the routing kernel (softmax + top-k + renormalise in one program per token) against the torch ops, same shapes,
same process; outputs checked against each other first.

--fp8-ab: FP8 experts (weight-only: e4m3 weights, per-row scales and 128 x 128 block scales) against the bf16
experts, same shapes, 1-256 tokens, default path and tiles (the decode kernels up to 8 tokens, then the sorted
GEMM with the bf16-tuned tables); time, GB/s over the experts' bytes (scales included) and the speed-up. Each FP8
output is checked first against the bf16 kernel on the dequantised weights. One H200: about 2 minutes.
--decode-sweep --fp8 row|block: the decode kernels' tile sweep on FP8 experts (their tiles are the bf16 ones).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def graph_ms(fn, reps: int = 20) -> float:
    """Mean time of `fn` replayed `reps` times inside one CUDA graph (launch gaps as in the decode graphs)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(reps):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    n = 10
    t = time.perf_counter()
    for _ in range(n):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (n * reps) * 1e3


def write_record(path: str, rows: list, mode: str | None = None) -> None:
    """The run's record: device, versions, the tree that ran ($TREE_COMMIT) and the rows."""
    import torch
    rec = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "tree_commit": os.environ.get("TREE_COMMIT")}
    if mode:
        rec["mode"] = mode
    with open(path, "w") as f:
        json.dump({**rec, "rows": rows}, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="moe_kernel.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-ab", action="store_true")
    ap.add_argument("--decode-sweep", action="store_true", help="tiles of the decode kernels, one kernel at a time")
    ap.add_argument("--tune", metavar="DIR", help="sweep the sorted grouped GEMM's tiles per token count and write "
                    "the table the kernel reads (moe_configs/E=..,I=..,H=..,device=...json) into DIR")
    ap.add_argument("--tune-shapes", default="128x768",
                    help="EXPERTSxWIDTH of one rank's experts: 128x768 (TP=1), 128x384 / 128x192 (experts TP-sharded "
                         "over 2 / 4), 64x768 / 32x768 (expert parallel over 2 / 4)")
    ap.add_argument("--tune-tokens", default="16,64,256,1024,4096")
    ap.add_argument("--fp8-ab", action="store_true", help="FP8 experts (per-row and block scales) against bf16")
    ap.add_argument("--fp8", choices=("row", "block"), help="--decode-sweep on FP8 experts with these scales")
    ap.add_argument("--widths", default="768", help="--fp8-ab: expert widths (768 = TP 1, 384 = TP 2, 192 = TP 4)")
    a = ap.parse_args()
    if a.fp8_ab:
        return fp8_ab(a.out, [int(w) for w in a.widths.split(",")])
    if a.tune:
        return tune(a.tune, [tuple(int(v) for v in x.split("x")) for x in a.tune_shapes.split(",")],
                    [int(t) for t in a.tune_tokens.split(",")], a.out)
    if a.decode_sweep:
        return decode_sweep(a.out, a.fp8)
    if a.decode_ab:
        return decode_ab(a.out)
    import torch
    from strata.ops.triton_kernels.fused_moe import default_config, fused_moe
    if not torch.cuda.is_available():
        print("needs a GPU", file=sys.stderr)
        return 2
    dev, dt = "cuda", torch.bfloat16
    E, k, H = 128, 8, 2048
    tokens = [1, 8, 64] if a.quick else [1, 4, 16, 64, 256, 1024]
    widths = [768] if a.quick else [768, 384, 192]  # TP = 1, 2, 4
    space = list(itertools.product([16, 32, 64], [32, 64, 128], [64, 128, 256], [4, 8], [None, 4]))
    if a.quick:
        space = space[::5]
    rows = []
    for I in widths:
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H ** 0.5).to(dt)
        w2 = (torch.randn(E, H, I, device=dev, generator=g) / I ** 0.5).to(dt)
        for T in tokens:
            x = torch.randn(T, H, device=dev, generator=g).to(dt)
            w, ids = torch.softmax(torch.randn(T, E, device=dev, generator=g), -1).topk(k)
            experts = int(torch.unique(ids).numel())
            nbytes = experts * (3 * I * H) * 2  # the experts this batch touches, read once
            base = fused_moe(x, w13, w2, w, ids)
            d_cfg = default_config(T * k, E)
            d_ms = graph_ms(lambda: fused_moe(x, w13, w2, w, ids))
            best = (d_ms, d_cfg)
            for bm, bn, bk, nw, ns in space:
                cfg = {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns}
                try:
                    out = fused_moe(x, w13, w2, w, ids, config=cfg)
                    if not torch.allclose(out.float(), base.float(), atol=3e-2, rtol=3e-2):
                        continue
                    ms = graph_ms(lambda: fused_moe(x, w13, w2, w, ids, config=cfg))
                except Exception:  # noqa: BLE001 - a tile that does not fit (shared memory)
                    continue
                if ms < best[0]:
                    best = (ms, cfg)
            r = {"tokens": T, "expert_width": I, "experts_touched": experts, "default_ms": round(d_ms, 4),
                 "default_GBps": round(nbytes / d_ms / 1e6, 1), "best_ms": round(best[0], 4),
                 "best_GBps": round(nbytes / best[0] / 1e6, 1), "best_config": best[1]}
            print(json.dumps(r), flush=True)
            rows.append(r)
    write_record(a.out, rows)
    return 0


def tune(out_dir: str, shapes: list[tuple[int, int]], tokens: list[int], out_path: str) -> int:
    """Per token count: every tile config of a pruned space, output checked against the default's, timed in a
    CUDA graph; the fastest goes into the table. Qwen3-30B-A3B's experts (top-8 of 128, hidden 2048), as one rank
    holds them: (experts, width) per shape; under expert parallelism the other ranks' pairs are routed to -1."""
    import torch
    from strata.ops.triton_kernels import fused_moe as fm
    dev, dt = "cuda", torch.bfloat16
    k, H, E_all = 8, 2048, 128
    space = [{"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns}
             for bm in (16, 32, 64, 128) for bn in (64, 128) for bk in (64, 128) for nw in (4, 8) for ns in (3, 4)]
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for E, I in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H ** 0.5).to(dt)
        w2 = (torch.randn(E, H, I, device=dev, generator=g) / I ** 0.5).to(dt)
        table = {}
        for T in tokens:
            x = torch.randn(T, H, device=dev, generator=g).to(dt)
            w, ids = torch.softmax(torch.randn(T, E_all, device=dev, generator=g), -1).topk(k)
            ids = torch.where(ids < E, ids, -1)  # rank 0 of E_all / E expert-parallel ranks
            per_expert = T * k / E_all
            base = fm.fused_moe(x, w13, w2, w, ids, config={})
            reps = 20 if T <= 256 else 5
            d_ms = graph_ms(lambda: fm.fused_moe(x, w13, w2, w, ids, config={}), reps)
            best = (d_ms, fm.default_config(T * k, E))
            for cfg in space:
                if cfg["block_m"] > max(16, 4 * per_expert):  # blocks mostly padding
                    continue
                try:
                    out = fm.fused_moe(x, w13, w2, w, ids, config=cfg)
                    if not torch.allclose(out.float(), base.float(), atol=3e-2, rtol=3e-2):
                        continue
                    ms = graph_ms(lambda: fm.fused_moe(x, w13, w2, w, ids, config=cfg), reps)
                except Exception:  # noqa: BLE001 - a tile that does not fit (shared memory)
                    continue
                if ms < best[0]:
                    best = (ms, cfg)
            table[str(T)] = best[1]
            r = {"tokens": T, "experts": E, "expert_width": I, "default_ms": round(d_ms, 4), "best_ms": round(best[0], 4),
                 "speedup": round(d_ms / best[0], 3), "best": best[1]}
            print(json.dumps(r), flush=True)
            rows.append(r)
        name = fm.config_file_name(E, I, H, torch.cuda.get_device_name())
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump({"configs": table, "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "tree_commit": os.environ.get("TREE_COMMIT"),
                       "command": "python benchmarks/moe_kernel.py --tune", "top_k": k}, f, indent=1)
        print("wrote", name, flush=True)
        write_record(out_path, rows, "tune")  # after every shape: a run cut short keeps what it measured
    return 0


def fp8_experts(w, scheme: str):
    """w [E, N, K] -> (e4m3 weights, float32 scales, block size or None, dequantised bf16 weights): scale = amax / 448
    per row, or per 128 x 128 block (`block`)."""
    import torch
    E, N, K = w.shape
    if scheme == "row":
        s = w.float().abs().amax(dim=-1).clamp(min=1e-12) / 448.0  # [E, N]
        q = (w.float() / s[..., None]).to(torch.float8_e4m3fn)
        return q, s, None, (q.float() * s[..., None]).to(torch.bfloat16)
    b = 128
    p = torch.nn.functional.pad(w.float().abs(), (0, (-K) % b, 0, (-N) % b))
    s = p.view(E, p.shape[1] // b, b, p.shape[2] // b, b).amax(dim=(2, 4)).clamp(min=1e-12) / 448.0
    full = s.repeat_interleave(b, 1)[:, :N].repeat_interleave(b, 2)[:, :, :K]
    q = (w.float() / full).to(torch.float8_e4m3fn)
    return q, s, (b, b), (q.float() * full).to(torch.bfloat16)


def fp8_ab(out_path: str, widths: list[int]) -> int:
    """bf16 experts against FP8 experts (per-row and block scales) through `fused_moe`'s default path."""
    import torch
    from strata.ops.triton_kernels import fused_moe as fm
    dev, dt = "cuda", torch.bfloat16
    E, k, H = 128, 8, 2048
    rows = []
    for I in widths:
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H ** 0.5).to(dt)
        w2 = (torch.randn(E, H, I, device=dev, generator=g) / I ** 0.5).to(dt)
        variants = {"bf16": (w13, w2, {}, None)}
        for scheme in ("row", "block"):
            q13, s13, b13, d13 = fp8_experts(w13, scheme)
            q2, s2, b2, d2 = fp8_experts(w2, scheme)
            variants[f"fp8_{scheme}"] = (q13, q2, dict(w13_scale=s13, w2_scale=s2, w13_block=b13, w2_block=b2),
                                         (d13, d2))
        for T in (1, 2, 4, 8, 16, 64, 256):
            x = torch.randn(T, H, device=dev, generator=g).to(dt)
            w, ids = torch.softmax(torch.randn(T, E, device=dev, generator=g), -1).topk(k)
            touched = int(torch.unique(ids).numel())
            r = {"tokens": T, "expert_width": I, "experts_touched": touched,
                 "decode_path": fm.use_decode_path(T, k, E)}
            for name, (a13, a2, kw, deq) in variants.items():
                out = fm.fused_moe(x, a13, a2, w, ids, **kw)
                if deq is not None:  # against the bf16 kernel on the dequantised weights
                    ref_out = fm.fused_moe(x, deq[0], deq[1], w, ids)
                    r[f"{name}_max_abs_diff"] = round((out.float() - ref_out.float()).abs().max().item(), 5)
                ms = graph_ms(lambda: fm.fused_moe(x, a13, a2, w, ids, **kw))
                scales = [t for t in (kw.get("w13_scale"), kw.get("w2_scale")) if t is not None]
                per_expert = sum(t[0].numel() * t.element_size() for t in [a13, a2, *scales])
                r[f"{name}_ms"] = round(ms, 4)
                r[f"{name}_GBps"] = round(touched * per_expert / ms / 1e6, 1)
            for name in ("fp8_row", "fp8_block"):
                r[f"{name}_speedup"] = round(r["bf16_ms"] / r[f"{name}_ms"], 3)
            print(json.dumps(r), flush=True)
            rows.append(r)
    write_record(out_path, rows, "fp8-ab")
    return 0


def decode_sweep(out_path: str, fp8: str | None = None) -> int:
    """Coordinate sweep of `fused_moe_decode`'s tiles: the up kernel's (bn, bk, warps) with the down kernel at its
    default, then the down kernel's with the up kernel at its default. Each config's output is checked against the
    default's first; the bandwidth counts the bytes of the pairs' experts (each pair reads its own).
    fp8: "row" | "block": the experts in FP8 with those scales (`fp8_experts`)."""
    import torch
    from strata.ops.triton_kernels import fused_moe as fm
    dev, dt = "cuda", torch.bfloat16
    E, k, H = 128, 8, 2048
    up_space = [{"up_bn": bn, "up_bk": bk, "up_warps": w} for bn in (8, 16, 32, 64) for bk in (128, 256, 512)
                for w in (2, 4, 8)]
    down_space = [{"down_bn": bn, "down_bk": bk, "down_warps": w} for bn in (4, 8, 16, 32) for bk in (64, 128, 256, 512)
                  for w in (4, 8) if bn * bk * 8 <= 65536]
    if fp8:  # one byte per weight: deeper tiles too
        up_space += [{"up_bn": bn, "up_bk": 1024, "up_warps": w} for bn in (4, 8, 16) for w in (2, 4, 8)]
        down_space += [{"down_bn": bn, "down_bk": 1024, "down_warps": w} for bn in (2, 4, 8) for w in (4, 8)]
    rows = []
    for I in (768, 384, 192):
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H ** 0.5).to(dt)
        w2 = (torch.randn(E, H, I, device=dev, generator=g) / I ** 0.5).to(dt)
        kw = {}
        if fp8:
            w13, s13, b13, _ = fp8_experts(w13, fp8)
            w2, s2, b2, _ = fp8_experts(w2, fp8)
            kw = dict(w13_scale=s13, w2_scale=s2, w13_block=b13, w2_block=b2)
        for T in (1, 2, 4, 8):
            x = torch.randn(T, H, device=dev, generator=g).to(dt)
            w, ids = torch.softmax(torch.randn(T, E, device=dev, generator=g), -1).topk(k)
            nbytes = T * k * 3 * I * H * w13.element_size()
            base = fm.fused_moe_decode(x, w13, w2, w, ids, **kw)
            d_cfg = fm.decode_config(I, H)
            d_ms = graph_ms(lambda: fm.fused_moe_decode(x, w13, w2, w, ids, **kw))
            r = {"tokens": T, "expert_width": I, "default": d_cfg, "default_ms": round(d_ms, 4),
                 "default_GBps": round(nbytes / d_ms / 1e6, 1)}
            for part, space in (("up", up_space), ("down", down_space)):
                best = (d_ms, {})
                for cfg in space:
                    try:
                        out = fm.fused_moe_decode(x, w13, w2, w, ids, config=cfg, **kw)
                        if not torch.allclose(out.float(), base.float(), atol=2e-2, rtol=2e-2):
                            print("mismatch", T, I, cfg, flush=True)
                            continue
                        ms = graph_ms(lambda: fm.fused_moe_decode(x, w13, w2, w, ids, config=cfg, **kw))
                    except Exception as e:  # noqa: BLE001 - a tile that does not fit
                        print("failed", cfg, repr(e)[:120], flush=True)
                        continue
                    if ms < best[0]:
                        best = (ms, cfg)
                r[f"best_{part}_ms"] = round(best[0], 4)
                r[f"best_{part}"] = best[1]
            both = {**r["best_up"], **r["best_down"]}
            r["both_ms"] = round(graph_ms(lambda: fm.fused_moe_decode(x, w13, w2, w, ids, config=both, **kw)), 4)
            r["both_GBps"] = round(nbytes / r["both_ms"] / 1e6, 1)
            print(json.dumps(r), flush=True)
            rows.append(r)
    write_record(out_path, rows, "decode-sweep" + (f"-fp8-{fp8}" if fp8 else ""))
    return 0


def decode_ab(out_path: str) -> int:
    import torch
    from strata.ops import moe_ref
    from strata.ops.triton_kernels import fused_moe as fm
    dev, dt = "cuda", torch.bfloat16
    E, k, H = 128, 8, 2048
    rows = []
    for I in (768, 384, 192):  # TP = 1, 2, 4
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H ** 0.5).to(dt)
        w2 = (torch.randn(E, H, I, device=dev, generator=g) / I ** 0.5).to(dt)
        for T in (1, 2, 4, 8, 16):
            x = torch.randn(T, H, device=dev, generator=g).to(dt)
            w, ids = torch.softmax(torch.randn(T, E, device=dev, generator=g), -1).topk(k)
            touched = int(torch.unique(ids).numel())
            dec = fm.fused_moe_decode(x, w13, w2, w, ids)
            srt = fm.fused_moe(x, w13, w2, w, ids, config={})  # a config forces the sorted path
            err = (dec.float() - srt.float()).abs().max().item()
            d_ms = graph_ms(lambda: fm.fused_moe_decode(x, w13, w2, w, ids))
            s_ms = graph_ms(lambda: fm.fused_moe(x, w13, w2, w, ids, config={}))
            r = {"tokens": T, "expert_width": I, "experts_touched": touched, "pairs": T * k,
                 "decode_path_default": fm.use_decode_path(T, k, E), "decode_ms": round(d_ms, 4),
                 "sorted_ms": round(s_ms, 4), "decode_GBps_pairs": round(T * k * 3 * I * H * 2 / d_ms / 1e6, 1),
                 "max_abs_diff": err}
            print(json.dumps(r), flush=True)
            rows.append(r)
    for T in (1, 16, 256, 2048):  # the sorted path's alignment: two kernels against ~20 torch ops
        ids = torch.softmax(torch.randn(T, E, device=dev), -1).topk(k)[1]
        a, b = fm.moe_align(ids, E, 16), fm.moe_align_torch(ids, E, 16)
        n = int(b[2])
        same = bool(torch.equal(a[0][:n], b[0][:n]) and int(a[2]) == n)
        r = {"align_tokens": T, "kernel_ms": round(graph_ms(lambda: fm.moe_align(ids, E, 16)), 4),
             "torch_ms": round(graph_ms(lambda: fm.moe_align_torch(ids, E, 16)), 4), "equal": same}
        print(json.dumps(r), flush=True)
        rows.append(r)
    for T in (1, 16, 256):
        logits = torch.randn(T, E, device=dev).to(dt)
        wk, ik = fm.select_experts(logits, k, True)
        wr, ir = moe_ref.select_experts(logits, k, True)
        same = float((ik == ir).float().mean())
        r = {"route_tokens": T, "kernel_ms": round(graph_ms(lambda: fm.select_experts(logits, k, True)), 4),
             "torch_ms": round(graph_ms(lambda: moe_ref.select_experts(logits, k, True)), 4),
             "ids_equal_frac": same, "max_w_diff": (wk - wr).abs().max().item()}
        print(json.dumps(r), flush=True)
        rows.append(r)
    write_record(out_path, rows, "decode-ab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
