"""Skinny GEMM for decode steps: out[M, N] = x[M, K] @ w[N, K]^T (+ bias) with few rows (M <= 16).

At batch 1-16 a linear layer is a read of its weight matrix: the time is bytes / bandwidth, and what matters is
keeping enough loads in flight on every SM. Each program owns BLOCK_N output columns and one of SPLIT_K slices
of K, and streams its [BLOCK_N, BLOCK_K] weight tiles (contiguous along K) through a tl.dot against the
activation rows (padded to 16, the smallest dot tile; compute is free here). With SPLIT_K > 1 the programs write
fp32 partial sums and a second kernel adds them (and the bias) and casts.

Which configuration runs, or whether cuBLAS runs instead, is decided per (M bucket, N, K, dtype) on the device by
timing each candidate once inside a CUDA graph (see `_graph_ms`), the first time that shape is seen outside a
capture (the engine's warm-up sees every decode batch size before capturing). So at a timed shape this path is
never slower than cuBLAS; the choice is logged once per shape. Twin: `torch.nn.functional.linear`.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import dot_precision, interpreting, mm, next_pow2

log = logging.getLogger("strata.ops")

MAX_M = 16

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
CANDIDATES = [
    (64, 128, 1, 4, 4), (32, 256, 1, 4, 3), (128, 128, 1, 4, 3), (16, 256, 1, 4, 4),
    (64, 128, 2, 4, 4), (32, 256, 2, 4, 3), (32, 128, 4, 4, 4), (64, 128, 4, 4, 4),
    (32, 256, 4, 4, 3), (16, 256, 4, 4, 4), (32, 128, 8, 4, 4), (64, 128, 8, 4, 3),
]
DEFAULT = (32, 128, 4, 4, 4)  # used without timing (interpreter, or a shape first seen inside a capture)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, s_xm, s_wn, s_om,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_hi
        w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        acc += mm(x, tl.trans(w.to(x.dtype)), DOT_PREC, INTERP)
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m)[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=omask)


@triton.jit(do_not_specialize=["M"])
def _split_reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, s_om, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                         BLOCK: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * s_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cfg: tuple) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    bn, bk, split, warps, stages = cfg
    split = max(1, min(split, triton.cdiv(K, bk)))
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out
    b = bias if bias is not None else out
    _skinny_kernel[(triton.cdiv(N, bn), split)](
        x, w, b, out, part, M, N, K, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, next_pow2(M)), BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
        DOT_PREC=dot_precision(x.dtype), INTERP=interpreting(), num_warps=warps, num_stages=stages)
    if split > 1:
        blk = 1024
        _split_reduce_kernel[(M, triton.cdiv(N, blk))](part, b, out, M, N, out.stride(0),
                                                       HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=blk,
                                                       num_warps=4)
    return out


_choice: dict[tuple, tuple | None] = {}  # (M bucket, N, K, dtype, device, bias) -> config, or None for cuBLAS
_timed: dict[tuple, tuple[float, float]] = {}  # the same keys -> (best us, cuBLAS us) when timed


# Timing: the candidates run back to back inside one CUDA graph, as they do in a decode graph, over enough copies
# of the weight that none is still in L2 when its turn comes (a decode step reads gigabytes between two uses of a
# matrix). Timing isolated launches instead (triton's do_bench) measures launch overhead and an L2 flush, 15-25 us
# where the in-graph kernels take 8-15 us, and cannot tell the candidates apart (H200, 2026-11-22).
_STREAM_BYTES = 256 << 20


def _graph_ms(call, x: torch.Tensor, copies: list[torch.Tensor], bias: torch.Tensor | None, rounds: int) -> float:
    """Milliseconds per call of `call(x, w, bias)` replayed from a CUDA graph, cycling through `copies`."""
    for w in copies:  # compile and warm outside the capture
        call(x, w, bias)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(rounds):
            for w in copies:
                call(x, w, bias)
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / (rounds * len(copies)))
    g.reset()
    return best


def _tune(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, key: tuple) -> tuple | None:
    n = max(2, min(64, -(-_STREAM_BYTES // (w.numel() * w.element_size()))))
    copies = [w] + [w.clone() for _ in range(n - 1)]
    rounds = max(1, 48 // n)
    linear = torch.nn.functional.linear
    try:
        times = {None: _graph_ms(linear, x, copies, bias, rounds)}
    except Exception as e:  # no graph timing here: keep cuBLAS
        log.warning("skinny_gemm: could not time M<=%d N=%d K=%d (%s); using cuBLAS", key[0], key[1], key[2], e)
        return None
    ref = linear(x.float(), w.float(), None if bias is None else bias.float())
    tol = 2e-2 * ref.abs().max().item() + 1e-3
    for cfg in CANDIDATES:
        try:
            got = _launch(x, w, bias, cfg)
            if (got.float() - ref).abs().max().item() > tol:  # never pick a config that computes wrong sums
                continue
            times[cfg] = _graph_ms(lambda a, b, c, cfg=cfg: _launch(a, b, c, cfg), x, copies, bias, rounds)
        except Exception as e:  # out of resources on this device: skip the config
            log.debug("skinny_gemm config %s failed: %s", cfg, e)
    del copies
    best = min(times, key=times.get)
    _timed[key] = (1e3 * times[best], 1e3 * times[None])
    log.info("skinny_gemm M<=%d N=%d K=%d: %s (%.1f us; cuBLAS %.1f us)", key[0], key[1], key[2],
             "cuBLAS" if best is None else f"triton {best}", 1e3 * times[best], 1e3 * times[None])
    return best


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_M), w [N, K], last dims contiguous. Returns [M, N] in x's dtype."""
    M, K = x.shape
    assert M <= MAX_M and w.shape[1] == K and x.stride(-1) == 1 and w.stride(-1) == 1
    if M == 0:
        return torch.empty((0, w.shape[0]), dtype=x.dtype, device=x.device)
    if interpreting() or x.device.type != "cuda":
        return _launch(x, w, bias, DEFAULT)
    key = (next_pow2(M), w.shape[0], K, x.dtype, x.device.index, bias is not None)
    if key not in _choice:
        if torch.cuda.is_current_stream_capturing():
            return _launch(x, w, bias, DEFAULT)  # never time inside a capture; warm-up should have seen it
        _choice[key] = _tune(x, w, bias, key)
    cfg = _choice[key]
    if cfg is None:
        return torch.nn.functional.linear(x, w, bias)
    return _launch(x, w, bias, cfg)


def tuned_choices() -> dict[str, str]:
    """What each timed shape runs (for benchmark records)."""
    out = {}
    for k, v in _choice.items():
        name = "cuBLAS" if v is None else f"triton {v}"
        if k in _timed:
            name += f": {_timed[k][0]:.1f} us (cuBLAS {_timed[k][1]:.1f} us)"
        out[f"M<={k[0]} N={k[1]} K={k[2]}{' bias' if k[5] else ''}"] = name
    return out
