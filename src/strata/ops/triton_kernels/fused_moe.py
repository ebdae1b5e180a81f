"""Fused MoE: a grouped GEMM over tokens sorted by expert. Twin: `strata.ops.moe_ref.fused_moe` (same arguments).

    x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k] -> [T, H]

1. Align (two small kernels, static shapes, no host sync: capturable in a CUDA graph): the T*k (token, choice) pairs are sorted by expert and each
   expert's run is padded to a multiple of BLOCK_M with a sentinel, so every BLOCK_M-row block belongs to one
   expert (`block_expert`). The grid is sized by an upper bound (ceil(T*k / BLOCK_M) + E blocks); blocks past
   the padded total return at once.
2. GEMM 1: each program multiplies BLOCK_M gathered rows of x (row = pair // k) by a BLOCK_N slice of its
   expert's w13, writing [T*k, 2I] in pair order.
3. silu(gate) * up -> [T*k, I] (the `silu_and_mul` kernel).
4. GEMM 2: the same over w2 (row = pair), scaled by the pair's routing weight, written in fp32.
5. The k rows of each token are summed in fp32 and rounded once.
Pairs whose expert id is outside [0, E) are never scheduled and contribute zero (as in the twin).

Few tokens (decode: T * k <= E / 2, or one token) take a second path with no alignment at all, because at batch 1
the ~20 small alignment ops cost more than the expert GEMMs (on one H200 the MoE model's batch-1 token took
8.8 ms against 3.3 ms planned). Two kernels, one program per (pair or token, column block), matrix-vector
products on CUDA cores (M is 1 per pair, so tensor-core tiles would be mostly padding):
  up:    act[p] = silu(x[p // k] @ w13[e_p, :I].T) * (x[p // k] @ w13[e_p, I:].T)   rounded to the input dtype
  down:  out[t] = sum_j w[t, j] * round(act[t k + j] @ w2[e_{t k + j}].T)          fp32 sum, rounded once
Each pair reads its own expert's weights, so two pairs on one expert read it twice: cheap while pairs are few
next to experts, which is what the threshold keeps. `select_experts` (softmax, top-k, renormalise) is one
kernel too; its twin is `strata.ops.moe_ref.select_experts`.

FP8 experts, weight-only (W8A16): w13 / w2 float8_e4m3fn with float32 scales (`weight_scales`). Every kernel
loads the e4m3 tile (half the bytes: the point at batch 1, where the experts' bytes are the time) and converts it
in registers; activations stay in their dtype. Per-row scales multiply the fp32 accumulator after the K loop;
block scales multiply each K tile's partial product (one scale per column of the tile when the tile lies inside
one block; the decode kernels sum each block's products apart when a tile spans several; the grouped GEMM
dequantises the tile before the dot only for blocks narrower than 16 columns). `W_SCALE` is a constexpr: the
16-bit kernels compile as before.
"""
from __future__ import annotations

import functools
import json
import math
import os

import torch
import triton
import triton.language as tl

from strata import settings
from strata.ops.triton_kernels._utils import dot_precision, interpreting, mm
from strata.ops.triton_kernels.activation import silu_and_mul


@triton.jit(do_not_specialize=["num_pairs"])  # T * top_k changes every step
def _moe_gemm_kernel(a_ptr, w_ptr, c_ptr, weight_ptr, sorted_ptr, block_expert_ptr, total_ptr, s_ptr,
                     N, K, num_pairs, a_row_div,
                     s_am, s_ak, s_we, s_wn, s_wk, s_cm, s_cn, s_se, s_sn, s_sk,
                     MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
                     W_SCALE: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr):
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
    s_base = s_ptr + e * s_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptr + a_row[:, None] * s_am + offs_k[None, :] * s_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = tl.load(w_ptr + e * s_we + offs_n[None, :] * s_wn + offs_k[:, None] * s_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        if W_SCALE == 0:  # weights in the activation dtype
            acc += mm(a, b, DOT_PREC, INTERP)
        elif W_SCALE == 1:  # FP8, a scale per output row: applied after the loop
            acc += mm(a, b.to(a.dtype), DOT_PREC, INTERP)
        elif SBK % BLOCK_K == 0:  # FP8 blocks, the K tile inside one block: one scale per column of the tile
            s = tl.load(s_base + (offs_n // SBN) * s_sn + (k0 // SBK) * s_sk, mask=n_ok, other=0.0)
            acc += mm(a, b.to(a.dtype), DOT_PREC, INTERP) * s[None, :]
        else:  # FP8 blocks narrower than the K tile: the tile is dequantised before the dot
            s = tl.load(s_base + (offs_n // SBN)[None, :] * s_sn + (offs_k // SBK)[:, None] * s_sk,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += mm(a, (b.to(tl.float32) * s).to(a.dtype), DOT_PREC, INTERP)
    if W_SCALE == 1:
        acc = acc * tl.load(s_base + offs_n * s_sn, mask=n_ok, other=0.0)[None, :]
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(c_ptr + pair[:, None] * s_cm + offs_n[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0):
    """Twin of `moe_align` in torch ops (about 20 launches): (sorted pair ids [max_blocks * block_m], expert of each block [max_blocks], padded total [1], max_blocks).

    Static shapes and no host synchronisation (no bincount, no boolean indexing), so that it can be captured in
    a CUDA graph: invalid pairs sort last and are scattered into a spare slot that is cut off."""
    flat = topk_ids.reshape(-1).long() - expert_offset
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


@triton.jit(do_not_specialize=["P"])
def _moe_count_kernel(ids_ptr, counts_ptr, P, offset, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    n = tl.zeros((BLOCK,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1) - offset
        n += ((ids == e) & (offs < P)).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(n, axis=0))


@triton.jit(do_not_specialize=["P"])
def _moe_place_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, total_ptr, P, E, offset,
                      BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    e = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)
    mine = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    mine_padded = tl.sum(tl.where(offs_e == e, padded, 0), axis=0)
    if e == 0:
        tl.store(total_ptr, tl.sum(padded, axis=0))
    seen = start * 0
    for p0 in range(0, P, BLOCK):  # this expert's pairs, in pair order (a stable sort)
        offs = p0 + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1) - offset
        hit = ((ids == e) & (offs < P)).to(tl.int32)
        pos = start + seen + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=hit > 0)
        seen += tl.sum(hit, axis=0)
    pad = tl.arange(0, BLOCK_M)  # the padding of its last block: sentinel P
    tl.store(sorted_ptr + start + mine + pad, tl.zeros((BLOCK_M,), dtype=tl.int32) + P, mask=pad < mine_padded - mine)
    first = start // BLOCK_M
    for b0 in range(0, mine_padded // BLOCK_M, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        tl.store(block_expert_ptr + first + b, tl.zeros((BLOCK,), dtype=tl.int32) + e, mask=b < mine_padded // BLOCK_M)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0):
    """(sorted pair ids [max_blocks * block_m], expert of each block [max_blocks], padded total [1], max_blocks).

    Pairs sorted by expert (stable), each expert's run padded to a multiple of block_m with the sentinel P;
    invalid ids are left out. expert_offset: ids are global, this rank holds experts [offset, offset + E). Two kernels of one program per expert (count, then place), shapes fixed by
    (P, E), no host synchronisation: it runs inside the decode CUDA graphs. Entries past `total` are not
    written (the GEMM never reads them). Twin: `moe_align_torch`."""
    flat = topk_ids.reshape(-1)
    P, E, dev = flat.numel(), num_experts, flat.device
    max_blocks = triton.cdiv(P, block_m) + E
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    block = min(1024, max(16, triton.next_power_of_2(P)))
    _moe_count_kernel[(E,)](flat, counts, P, expert_offset, BLOCK=block, num_warps=4)
    _moe_place_kernel[(E,)](flat, counts, sorted_ids, block_expert, total, P, E, expert_offset, BLOCK_M=block_m,
                            BLOCK=block,
                            BLOCK_E=triton.next_power_of_2(E), num_warps=4)
    return sorted_ids, block_expert, total, max_blocks


def weight_scales(w: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int] | None):
    """An expert weight's FP8 scale as the kernels take it: (scale tensor, W_SCALE, SBN, SBK, its 3 strides).
    W_SCALE 0: no scale (w in the activation dtype); 1: a scale per output row, [E, N]; 2: block-wise,
    [E, ceil(N / bn), ceil(K / bk)] with block = (bn, bk), powers of two."""
    if scale is None:
        if w.dtype == torch.float8_e4m3fn:
            raise ValueError("float8_e4m3fn expert weights need their scale")
        return w, 0, 1, 1, (0, 0, 0)
    if block is None:
        if scale.shape != w.shape[:2]:
            raise ValueError(f"per-row scale {tuple(scale.shape)} for experts {tuple(w.shape)}")
        return scale, 1, 1, 1, (scale.stride(0), scale.stride(1), 0)
    bn, bk = block
    if bn & (bn - 1) or bk & (bk - 1):
        raise ValueError(f"block sizes {block} are not powers of two")
    if scale.shape != (w.shape[0], triton.cdiv(w.shape[1], bn), triton.cdiv(w.shape[2], bk)):
        raise ValueError(f"block scale {tuple(scale.shape)} for experts {tuple(w.shape)} and blocks {block}")
    return scale, 2, bn, bk, tuple(scale.stride())


def _gemm(a, w, c, weights, sorted_ids, block_expert, total, max_blocks, num_pairs, a_row_div, mul_weight,
          block_m, block_n=64, block_k=64, num_warps=4, num_stages=None, scale=None, block=None):
    N, K = w.shape[1], w.shape[2]
    sc, mode, sbn, sbk, (s_se, s_sn, s_sk) = weight_scales(w, scale, block)
    block_n = max(16, min(block_n, triton.next_power_of_2(N)))
    block_k = max(16, min(block_k, triton.next_power_of_2(K), sbk if mode == 2 else block_k))  # K tiles inside blocks
    grid = (max_blocks, triton.cdiv(N, block_n))
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _moe_gemm_kernel[grid](a, w, c, weights, sorted_ids, block_expert, total, sc, N, K, num_pairs, a_row_div,
                           a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
                           c.stride(0), c.stride(1), s_se, s_sn, s_sk, MUL_WEIGHT=mul_weight, BLOCK_M=block_m,
                           BLOCK_N=block_n, BLOCK_K=block_k, DOT_PREC=dot_precision(a.dtype), INTERP=interpreting(),
                           W_SCALE=mode, SBN=sbn, SBK=sbk, num_warps=num_warps, **extra)


def default_config(num_pairs: int, num_experts: int) -> dict:
    """Tile sizes by rows per expert, where no tuned table covers the shape (see `tuned_config`)."""
    per_expert = num_pairs / num_experts
    return {"block_m": 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64, "block_n": 64, "block_k": 64,
            "num_warps": 4, "num_stages": None}


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_configs")


def config_file_name(E: int, I: int, H: int, device_name: str) -> str:
    """Tuned tiles of one expert shape on one GPU model: `E=128,I=768,H=2048,device=NVIDIA_H200.json`."""
    return f"E={E},I={I},H={H},device={device_name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=None)
def _load_tuned(path: str) -> dict[int, dict] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {int(t): c for t, c in json.load(f)["configs"].items()}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tuned_config(T: int, E: int, I: int, H: int, device_name: str | None) -> dict | None:
    """The tiles `benchmarks/moe_kernel.py --tune` measured best for the token count nearest T (log scale), from
    `moe_configs/` (or $STRATA_MOE_CONFIG_DIR), for this expert shape and GPU model; None if there is no table."""
    if device_name is None:
        return None
    table = _load_tuned(os.path.join(settings.MOE_CONFIG_DIR.get() or CONFIG_DIR,
                                     config_file_name(E, I, H, device_name)))
    if not table:
        return None
    return table[min(table, key=lambda t: (abs(math.log(t) - math.log(max(T, 1))), t))]


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict | None = None, expert_offset: int = 0,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              w13_block: tuple[int, int] | None = None, w2_block: tuple[int, int] | None = None) -> torch.Tensor:
    """config: tile sizes ({block_m, block_n, block_k, num_warps, num_stages}; default `default_config`).
    expert_offset: topk_ids are global and w13 / w2 hold experts [offset, offset + E) (expert parallelism);
    pairs routed elsewhere are skipped, as ids outside [0, E) are without an offset.
    FP8 experts (weight-only, W8A16): w13 / w2 float8_e4m3fn with w13_scale / w2_scale per output row [E, N], or
    per block [E, ceil(N / bn), ceil(K / bk)] with w13_block / w2_block = (bn, bk) (see `weight_scales`); each
    weight tile is converted to the activation dtype in registers, the activations are not quantised."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    P = T * k
    fp8 = dict(w13_scale=w13_scale, w2_scale=w2_scale, w13_block=w13_block, w2_block=w2_block)
    if config is None and use_decode_path(T, k, E):
        return fused_moe_decode(x, w13, w2, topk_weights, topk_ids, expert_offset=expert_offset, **fp8)
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    if config is None:
        name = _device_name(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
            if x.is_cuda else None
        config = tuned_config(T, E, two_i // 2, H, name) or {}
    cfg = {**default_config(P, E), **config}
    block_m = cfg["block_m"]
    tiles = {n: cfg[n] for n in ("block_n", "block_k", "num_warps", "num_stages")}
    sorted_ids, block_expert, total, max_blocks = moe_align(topk_ids, E, block_m, expert_offset)
    weights = topk_weights.reshape(-1).contiguous()
    x = x.contiguous()
    c1 = torch.empty((P, two_i), dtype=x.dtype, device=x.device)  # [T*k, 2I] in pair order
    _gemm(x, w13, c1, weights, sorted_ids, block_expert, total, max_blocks, P, k, False, block_m, **tiles,
          scale=w13_scale, block=w13_block)
    act = silu_and_mul(c1)  # [T*k, I]
    c2 = torch.zeros((P, H), dtype=torch.float32, device=x.device)  # unscheduled pairs stay 0
    _gemm(act, w2, c2, weights, sorted_ids, block_expert, total, max_blocks, P, 1, True, block_m, **tiles,
          scale=w2_scale, block=w2_block)
    return c2.view(T, k, H).sum(dim=1).to(x.dtype)


# ---------------------------------------------------------------------------------------------- decode path
@triton.jit
def _block_scaled_sum(p, s_rows, row_ok, k0, K, s_sk, R: tl.constexpr, SBK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row sums of the products p [R, BLOCK_K] (fp32; columns k0 + [0, BLOCK_K)) with each SBK-wide column block
    times its scale: s_rows [R] points at each row's scales, block j at s_rows + j * s_sk."""
    if BLOCK_K <= SBK:  # the tile lies in one block
        return tl.sum(p, axis=1) * tl.load(s_rows + (k0 // SBK) * s_sk, mask=row_ok, other=0.0)
    else:
        kb = k0 // SBK + tl.arange(0, BLOCK_K // SBK)
        part = tl.sum(tl.reshape(p, (R, BLOCK_K // SBK, SBK)), axis=2)  # [R, NB]
        s = tl.load(s_rows[:, None] + kb[None, :] * s_sk, mask=row_ok[:, None] & (kb * SBK < K)[None, :], other=0.0)
        return tl.sum(part * s, axis=1)


@triton.jit
def _moe_decode_up_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, s_ptr, I, H, E, offset,
                          s_xm, s_we, s_wn, s_wk, s_am, s_se, s_sn, s_sk,
                          K_TOP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          W_SCALE: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr):
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + p).to(tl.int64) - offset
    if (e < 0) | (e >= E):  # another rank's expert, or none: act[p] is never read
        return
    row = p // K_TOP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w_base = w_ptr + e * s_we
    s_base = s_ptr + e * s_se
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        xv = tl.load(x_ptr + row * s_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        m = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(w_base + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk, mask=m, other=0.0)
        wu = tl.load(w_base + (offs_n[:, None] + I) * s_wn + offs_k[None, :] * s_wk, mask=m, other=0.0)
        if W_SCALE == 2:  # FP8 blocks: each block's partial sum times its scale
            acc_g += _block_scaled_sum(wg.to(tl.float32) * xv[None, :], s_base + (offs_n // SBN) * s_sn, n_ok,
                                       k0, H, s_sk, BLOCK_N, SBK, BLOCK_K)
            acc_u += _block_scaled_sum(wu.to(tl.float32) * xv[None, :], s_base + ((offs_n + I) // SBN) * s_sn,
                                       n_ok, k0, H, s_sk, BLOCK_N, SBK, BLOCK_K)
        else:
            acc_g += tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
            acc_u += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
    if W_SCALE == 1:  # FP8, a scale per row
        acc_g = acc_g * tl.load(s_base + offs_n * s_sn, mask=n_ok, other=0.0)
        acc_u = acc_u * tl.load(s_base + (offs_n + I) * s_sn, mask=n_ok, other=0.0)
    out_ty = act_ptr.dtype.element_ty
    g = acc_g.to(out_ty).to(tl.float32)  # the GEMM's output rounds as in the twin
    u = acc_u.to(out_ty).to(tl.float32)
    tl.store(act_ptr + p * s_am + offs_n, (g * tl.sigmoid(g) * u).to(out_ty), mask=n_ok)


@triton.jit
def _moe_decode_down_kernel(act_ptr, w_ptr, ids_ptr, wts_ptr, out_ptr, s_ptr, H, I, E, offset,
                            s_am, s_we, s_wn, s_wk, s_om, s_se, s_sn, s_sk,
                            K_TOP: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, W_SCALE: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr):
    """One token's column block over all of its k pairs at once: [K_PAD, BLOCK_N, BLOCK_K] weight tiles, so that
    each iteration has k experts' loads in flight."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_j = tl.arange(0, K_PAD)
    pair = t * K_TOP + offs_j
    j_ok = offs_j < K_TOP
    e = tl.load(ids_ptr + pair, mask=j_ok, other=-1).to(tl.int64) - offset
    valid = j_ok & (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    wt = tl.where(valid, tl.load(wts_ptr + pair, mask=valid, other=0.0).to(tl.float32), 0.0)
    width = tl.where(valid, I, 0)  # an invalid pair loads nothing
    acc = tl.zeros((K_PAD, BLOCK_N), dtype=tl.float32)
    w_rows = w_ptr + e[:, None, None] * s_we + offs_n[None, :, None] * s_wn  # [K_PAD, BN, 1]
    s_ok = valid[:, None] & n_ok[None, :]  # [K_PAD, BN]
    s_rows = s_ptr + e[:, None] * s_se + (offs_n // SBN)[None, :] * s_sn  # [K_PAD, BN]: row (block) scales
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k[None, :] < width[:, None]  # [K_PAD, BK]
        a = tl.load(act_ptr + pair[:, None] * s_am + offs_k[None, :], mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, None, :] * s_wk, mask=k_ok[:, None, :] & n_ok[None, :, None], other=0.0)
        prod = w.to(tl.float32) * a[:, None, :]
        if W_SCALE == 2:  # FP8 blocks (as _block_scaled_sum, one more axis)
            if BLOCK_K <= SBK:
                acc += tl.sum(prod, axis=2) * tl.load(s_rows + (k0 // SBK) * s_sk, mask=s_ok, other=0.0)
            else:
                kb = k0 // SBK + tl.arange(0, BLOCK_K // SBK)
                part = tl.sum(tl.reshape(prod, (K_PAD, BLOCK_N, BLOCK_K // SBK, SBK)), axis=3)  # [K_PAD, BN, NB]
                s = tl.load(s_rows[:, :, None] + kb[None, None, :] * s_sk,
                            mask=s_ok[:, :, None] & (kb * SBK < I)[None, None, :], other=0.0)
                acc += tl.sum(part * s, axis=2)
        else:
            acc += tl.sum(prod, axis=2)
    if W_SCALE == 1:  # FP8, a scale per row
        acc = acc * tl.load(s_rows, mask=s_ok, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    y = acc.to(out_ty).to(tl.float32)  # each expert's output rounds as in the twin
    tl.store(out_ptr + t * s_om + offs_n, tl.sum(wt[:, None] * y, axis=0).to(out_ty), mask=n_ok)


def use_decode_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether `fused_moe` takes the alignment-free path."""
    return num_tokens == 1 or 2 * num_tokens * top_k <= num_experts


def decode_config(I: int, H: int) -> dict:
    """Tiles of the two decode kernels, from `benchmarks/moe_kernel.py --decode-sweep` on one H200 (2026-12-03,
    128 experts, top-8, hidden 2048, expert width 768 / 384 / 192, 1-8 tokens): narrow, deep blocks won at every
    shape, i.e. many programs each streaming long contiguous rows. The sweep's winners were within a few percent of
    each other, so one rule per kernel; I: expert width on this rank, H: hidden size."""
    return {"up_bn": 8, "up_bk": min(512, max(16, triton.next_power_of_2(H))), "up_warps": 2,
            "down_bn": 8 if I >= 768 else 4, "down_bk": 256 if I >= 768 else 128 if I >= 384 else 64,
            "down_warps": 4}


def fused_moe_decode(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, config: dict | None = None, expert_offset: int = 0,
                     w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                     w13_block: tuple[int, int] | None = None, w2_block: tuple[int, int] | None = None) -> torch.Tensor:
    """`fused_moe` for few tokens: the two matrix-vector kernels above, no alignment. config: `decode_config`
    (FP8 experts take the same tiles: not swept for them yet). FP8 scales as in `fused_moe`."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    I = two_i // 2
    P = T * k
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    c = {**decode_config(I, H), **(config or {})}
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    act = torch.empty((P, I), dtype=x.dtype, device=x.device)
    s1, mode1, sbn1, sbk1, st1 = weight_scales(w13, w13_scale, w13_block)
    s2, mode2, sbn2, sbk2, st2 = weight_scales(w2, w2_scale, w2_block)
    _moe_decode_up_kernel[(P, triton.cdiv(I, c["up_bn"]))](
        x, w13, ids, act, s1, I, H, E, expert_offset, x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), *st1, K_TOP=k, BLOCK_N=c["up_bn"], BLOCK_K=c["up_bk"], W_SCALE=mode1, SBN=sbn1, SBK=sbk1,
        num_warps=c["up_warps"])
    _moe_decode_down_kernel[(T, triton.cdiv(H, c["down_bn"]))](
        act, w2, ids, wts, out, s2, H, I, E, expert_offset, act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
        out.stride(0), *st2, K_TOP=k, K_PAD=triton.next_power_of_2(k), BLOCK_N=c["down_bn"], BLOCK_K=c["down_bk"],
        W_SCALE=mode2, SBN=sbn2, SBK=sbk2, num_warps=c["down_warps"])
    return out


# ---------------------------------------------------------------------------------------------- routing
@triton.jit
def _select_experts_kernel(logits_ptr, w_ptr, ids_ptr, E, s_lm,
                           K_TOP: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                           RENORM: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    logit = tl.load(logits_ptr + t * s_lm + offs, mask=ok, other=float("-inf")).to(tl.float32)
    z = tl.exp(logit - tl.max(logit, axis=0))
    z = tl.where(ok, z, 0.0)
    prob = tl.where(ok, z / tl.sum(z, axis=0), -1.0)  # padding can never be chosen
    kk = tl.arange(0, K_PAD)
    vals = tl.zeros((K_PAD,), dtype=tl.float32)
    idxs = tl.zeros((K_PAD,), dtype=tl.int64)
    for j in tl.static_range(K_TOP):
        best = tl.max(prob, axis=0)
        idx = tl.min(tl.where(prob == best, offs, BLOCK_E), axis=0)  # lowest index among equals
        vals = tl.where(kk == j, best, vals)
        idxs = tl.where(kk == j, idx.to(tl.int64), idxs)
        prob = tl.where(offs == idx, -1.0, prob)
    if RENORM:
        vals = vals / tl.sum(vals, axis=0)
    tl.store(w_ptr + t * K_TOP + kk, vals, mask=kk < K_TOP)
    tl.store(ids_ptr + t * K_TOP + kk, idxs, mask=kk < K_TOP)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """Twin: `strata.ops.moe_ref.select_experts`. (weights fp32 [T, k] in descending order, ids int64 [T, k])."""
    T, E = router_logits.shape
    w = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=router_logits.device)
    if T == 0:
        return w, ids
    _select_experts_kernel[(T,)](router_logits, w, ids, E, router_logits.stride(0), K_TOP=top_k,
                                 K_PAD=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(E),
                                 RENORM=renormalize, num_warps=4 if E > 256 else 1)
    return w, ids
