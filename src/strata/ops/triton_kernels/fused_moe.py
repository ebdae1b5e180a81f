"""Fused MoE: a grouped GEMM over tokens sorted by expert. Twin: `strata.ops.moe_ref.fused_moe` (same arguments).

    x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k] -> [T, H]

1. Align (torch, on the device, static shapes, no host sync: capturable in a CUDA graph): the T*k (token, choice) pairs are sorted by expert and each
   expert's run is padded to a multiple of BLOCK_M with a sentinel, so every BLOCK_M-row block belongs to one
   expert (`block_expert`). The grid is sized by an upper bound (ceil(T*k / BLOCK_M) + E blocks); blocks past
   the padded total return at once.
2. GEMM 1: each program multiplies BLOCK_M gathered rows of x (row = pair // k) by a BLOCK_N slice of its
   expert's w13, writing [T*k, 2I] in pair order.
3. silu(gate) * up -> [T*k, I].
4. GEMM 2: the same over w2 (row = pair), scaled by the pair's routing weight, written in fp32.
5. The k rows of each token are summed in fp32 and rounded once.
Pairs whose expert id is outside [0, E) are never scheduled and contribute zero (as in the twin).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import dot_precision, interpreting, mm


@triton.jit(do_not_specialize=["num_pairs"])  # T * top_k changes every step
def _moe_gemm_kernel(a_ptr, w_ptr, c_ptr, weight_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                     N, K, num_pairs, a_row_div,
                     s_am, s_ak, s_we, s_wn, s_wk, s_cm, s_cn,
                     MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    total = tl.load(total_ptr)
    if pid_m * BLOCK_M >= total:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m).to(tl.int64)  # [BM] pair ids; num_pairs = padding
    row_ok = pair < num_pairs
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    a_row = pair // a_row_div
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptr + a_row[:, None] * s_am + offs_k[None, :] * s_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = tl.load(w_ptr + e * s_we + offs_n[None, :] * s_wn + offs_k[:, None] * s_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        acc += mm(a, b, DOT_PREC, INTERP)
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(c_ptr + pair[:, None] * s_cm + offs_n[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted pair ids [max_blocks * block_m], expert of each block [max_blocks], padded total [1], max_blocks).

    Static shapes and no host synchronisation (no bincount, no boolean indexing), so that it can be captured in
    a CUDA graph: invalid pairs sort last and are scattered into a spare slot that is cut off."""
    flat = topk_ids.reshape(-1).long()
    P = flat.numel()
    E = num_experts
    dev = flat.device
    key = torch.where((flat >= 0) & (flat < E), flat, E)  # E = "no expert"
    counts_all = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts_all[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    ends_pad = torch.cumsum(padded, 0)
    starts_pad = torch.cat([ends_pad.new_zeros(1), ends_pad[:-1]])
    starts = torch.cumsum(counts_all, 0) - counts_all  # first sorted position of each key
    order = torch.argsort(key, stable=True)
    sorted_e = key[order]  # [P], ascending
    rank_in_e = torch.arange(P, device=dev) - starts[sorted_e]
    max_blocks = triton.cdiv(P, block_m) + E
    spare = max_blocks * block_m  # invalid pairs land here
    dest = torch.where(sorted_e < E, starts_pad[sorted_e.clamp(max=E - 1)] + rank_in_e, spare)
    sorted_ids = torch.full((spare + 1,), P, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:spare]
    block_starts = torch.arange(max_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(ends_pad, block_starts, right=True).clamp_(max=E - 1).to(torch.int32)
    total = ends_pad[-1:].to(torch.int32)
    return sorted_ids, block_expert, total, max_blocks


def _gemm(a, w, c, weights, sorted_ids, block_expert, total, max_blocks, num_pairs, a_row_div, mul_weight,
          block_m, block_n=64, block_k=64, num_warps=4, num_stages=None):
    N, K = w.shape[1], w.shape[2]
    block_n = max(16, min(block_n, triton.next_power_of_2(N)))
    block_k = max(16, min(block_k, triton.next_power_of_2(K)))
    grid = (max_blocks, triton.cdiv(N, block_n))
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _moe_gemm_kernel[grid](a, w, c, weights, sorted_ids, block_expert, total, N, K, num_pairs, a_row_div,
                           a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
                           c.stride(0), c.stride(1), MUL_WEIGHT=mul_weight, BLOCK_M=block_m, BLOCK_N=block_n,
                           BLOCK_K=block_k, DOT_PREC=dot_precision(a.dtype), INTERP=interpreting(),
                           num_warps=num_warps, **extra)


def default_config(num_pairs: int, num_experts: int) -> dict:
    """Tile sizes by rows per expert (the only heuristic so far; `benchmarks/moe_kernel.py` sweeps others)."""
    per_expert = num_pairs / num_experts
    return {"block_m": 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64, "block_n": 64, "block_k": 64,
            "num_warps": 4, "num_stages": None}


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """config: tile sizes ({block_m, block_n, block_k, num_warps, num_stages}; default `default_config`)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    P = T * k
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    cfg = {**default_config(P, E), **(config or {})}
    block_m = cfg["block_m"]
    tiles = {n: cfg[n] for n in ("block_n", "block_k", "num_warps", "num_stages")}
    sorted_ids, block_expert, total, max_blocks = moe_align(topk_ids, E, block_m)
    weights = topk_weights.reshape(-1).contiguous()
    x = x.contiguous()
    c1 = torch.empty((P, two_i), dtype=x.dtype, device=x.device)  # [T*k, 2I] in pair order
    _gemm(x, w13, c1, weights, sorted_ids, block_expert, total, max_blocks, P, k, False, block_m, **tiles)
    gate, up = c1.chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)  # [T*k, I]
    c2 = torch.zeros((P, H), dtype=torch.float32, device=x.device)  # unscheduled pairs stay 0
    _gemm(act, w2, c2, weights, sorted_ids, block_expert, total, max_blocks, P, 1, True, block_m, **tiles)
    return c2.view(T, k, H).sum(dim=1).to(x.dtype)
