"""Paged decode attention: one query token per sequence, GQA-aware, optional split-KV.

Stage 1: one program per (sequence, kv head, context partition). It holds all G = H / kvh query heads of
that kv head as the rows of one [G_P2, d] tile (G_P2 >= 16, the smallest tl.dot tile), so every K/V byte is
read from memory once per step. The context is walked in tiles of TILE tokens whose slots are looked up in
the page table token by token (any block_size works; each token's d-vector is one contiguous run of bytes).
Softmax is online (base 2), accumulation in fp32.

Without split (one partition per sequence) stage 1 writes the output. With split, it writes the normalised
partial output and its log-sum-exp per partition ([B, H, S, d] fp32, [B, H, S]), and stage 2 merges them.
Split-KV is what keeps enough programs in flight when B * kvh is small next to the number of SMs.

Each sequence is cut by its own length: partition_b = max(min_part, roundup(cdiv(seq_len_b, S), TILE)),
so S (chosen from B alone) needs neither max_seq_len nor a device sync, a CUDA graph captured for a batch
size does the same work as eager at every context length, and no programs are launched only to exit.

Sliding window (a runtime int, so one compiled kernel serves every layer and step): only the last `window`
keys of a sequence are visible, so the walk starts at seq_len - window and the split cuts that range, not
the whole context; blocks older than the window are never read. NO_WINDOW stands for "no window".

FP8 cache (float8_e4m3fn, KV_FP8): K/V tiles are loaded as e4m3 (half the bytes of bf16) and widened to q's dtype
for the dots; the layer's k_scale is folded into the softmax scale and v_scale into the output (both per tensor,
so this is exact), read from one-element tensors on the device.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import dot_precision, interpreting, mm, next_pow2, num_sms
from strata.ops.triton_kernels.cache import kv_scales

_LOG2E = 1.4426950408889634
# Never split a context into pieces shorter than this (tokens). One tile: at batch 1 (8 kv heads) a 1k context
# then runs as 17 x 8 one-tile programs instead of 5 x 8 four-tile ones; an H200 profile (2026-11-22) had stage 1
# at 9.7 us per layer with 256, all latency. Large batches do not split (S from B), so they are unaffected.
MIN_PARTITION = 64
MAX_SPLITS = 64
# Launch defaults, chosen without a GPU at hand: benchmarks/kernels.py sweeps them (and the split size) at
# batch 64 x 2k context; move these to its best row.
DEFAULT_TILE = 64
DEFAULT_WARPS = 4
DEFAULT_STAGES = 2
NO_WINDOW = 1 << 30  # a window longer than any context: every key is visible


@triton.jit
def _partition_len(seq_len, num_splits, min_part, TILE: tl.constexpr):
    return tl.maximum(min_part, tl.cdiv(tl.cdiv(seq_len, num_splits), TILE) * TILE)


@triton.jit
def _window_start(seq_len, window):
    """Position of the oldest key the query (at seq_len - 1) sees."""
    return tl.maximum(seq_len - window, 0)


# Ints that change from step to step (split count, block-table width, partition strides) are not specialised
# on (==1, %16): each value class would otherwise compile its own variant in the middle of serving.
@triton.jit(do_not_specialize=["num_splits", "min_part", "window", "s_btb", "s_lb", "s_lh"])
def _decode_stage1_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    k_scale_ptr, v_scale_ptr,                   # fp8 cache: one float32 each (read value = stored * scale)
    qk_scale,                                   # softmax scale * log2(e)
    num_splits, min_part,                       # S (grid axis 2) and the shortest partition, see above
    window,                                     # sliding window in tokens (NO_WINDOW = none)
    s_qb, s_qh, s_ob, s_oh,                     # q / out: [B, H, d], last dim contiguous
    s_cb, s_cs, s_ch,                           # caches: [num_blocks, block_size, kvh, d], same strides
    s_btb,                                      # block_tables row stride
    s_pb, s_ph, s_ps,                           # part_o: [B, H, S, d]
    s_lb, s_lh,                                 # part_lse: [B, H, S]
    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, KV_FP8: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    lo = _window_start(seq_len, window)
    if SPLIT:
        part = _partition_len(seq_len - lo, num_splits, min_part, TILE)
        start = lo + sp * part
        if start >= seq_len:
            return  # stage 2 only reads the partitions that hold tokens
        end = tl.minimum(seq_len, start + part)
    else:
        start = lo
        end = seq_len

    g = tl.arange(0, G_P2)
    d = tl.arange(0, D_P2)
    h = kh * G + g
    gmask = g < G
    if D == D_P2:
        qmask = gmask[:, None]
    else:
        qmask = gmask[:, None] & (d[None, :] < D)
    q = tl.load(q_ptr + b * s_qb + h[:, None] * s_qh + d[None, :], mask=qmask, other=0.0)  # [G_P2, D_P2]

    m_i = tl.full([G_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, D_P2], tl.float32)
    bt_row = bt_ptr + b * s_btb
    head_off = kh.to(tl.int64) * s_ch
    for t0 in range(start, end, TILE):
        offs = t0 + tl.arange(0, TILE)
        tmask = offs < end
        page = tl.load(bt_row + offs // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        row = page * s_cb + (offs % BLOCK_SIZE).to(tl.int64) * s_cs + head_off  # [TILE]
        ptrs = row[:, None] + d[None, :]
        if D == D_P2:
            lmask = tmask[:, None]
        else:
            lmask = tmask[:, None] & (d[None, :] < D)
        k = tl.load(k_cache_ptr + ptrs, mask=lmask, other=0.0)  # [TILE, D_P2]
        v = tl.load(v_cache_ptr + ptrs, mask=lmask, other=0.0)
        s = mm(q, tl.trans(k.to(q.dtype)), DOT_PREC, INTERP) * qk_scale  # [G_P2, TILE]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mm(p.to(q.dtype), v.to(q.dtype), DOT_PREC, INTERP)
        m_i = m_new

    # l_i == 0 only for an empty sequence (non-split path): write zeros, never NaN.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    if SPLIT:
        tl.store(part_o_ptr + b * s_pb + h[:, None] * s_ph + sp * s_ps + d[None, :], o, mask=qmask)
        tl.store(part_lse_ptr + b * s_lb + h * s_lh + sp, m_i + tl.log2(l_safe), mask=gmask)
    else:
        tl.store(out_ptr + b * s_ob + h[:, None] * s_oh + d[None, :], o.to(out_ptr.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=["num_splits", "min_part", "window", "s_lb", "s_lh"])
def _decode_stage2_kernel(
    part_o_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, num_splits, min_part, window,
    s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
    CHUNK: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, TILE: tl.constexpr,
):
    """Merge the partitions of one (sequence, head): only those holding tokens, CHUNK at a time."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    seq_len = seq_len - _window_start(seq_len, window)  # the keys stage 1 cut into partitions
    n = tl.cdiv(seq_len, _partition_len(seq_len, num_splits, min_part, TILE))
    c = tl.arange(0, CHUNK)
    d = tl.arange(0, D_P2)
    lse_row = part_lse_ptr + b * s_lb + h * s_lh
    o_row = part_o_ptr + b * s_pb + h * s_ph
    mx = tl.full([CHUNK], float("-inf"), tl.float32)
    for s0 in range(0, n, CHUNK):
        mx = tl.maximum(mx, tl.load(lse_row + s0 + c, mask=s0 + c < n, other=float("-inf")))
    m = tl.max(mx, axis=0)
    m = tl.where(n > 0, m, 0.0)
    acc = tl.zeros([D_P2], tl.float32)
    den = tl.zeros([CHUNK], tl.float32)
    for s0 in range(0, n, CHUNK):
        smask = s0 + c < n
        lse = tl.load(lse_row + s0 + c, mask=smask, other=float("-inf"))
        w = tl.where(smask, tl.exp2(lse - m), 0.0)  # [CHUNK]
        o = tl.load(o_row + (s0 + c)[:, None] * s_ps + d[None, :], mask=smask[:, None] & (d[None, :] < D),
                    other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
        den += w
    total = tl.sum(den, axis=0)
    total = tl.where(total > 0.0, total, 1.0)  # an empty sequence gives zeros
    tl.store(out_ptr + b * s_ob + h * s_oh + d, (acc / total).to(out_ptr.dtype.element_ty), mask=d < D)


def choose_num_splits(batch: int, num_kv_heads: int, device: torch.device,
                      max_seq_len: int | None = None) -> int:
    """Split-KV factor S (1 = no split), from the batch alone.

    Split when B * kvh programs would leave the GPU short of programs in flight (fewer than ~8 per SM), by
    as much as closes that gap (at most MAX_SPLITS). A max_seq_len, when given, only caps S so that no
    partition falls below MIN_PARTITION tokens.
    """
    base = batch * num_kv_heads
    target = 8 * num_sms(device)
    if base >= target:
        return 1
    s = min(triton.cdiv(target, base), MAX_SPLITS)
    if max_seq_len is not None:
        s = min(s, triton.cdiv(int(max_seq_len), MIN_PARTITION))
    return max(s, 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int | None = None, *, sliding_window: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           num_splits: int | None = None,
                           min_partition: int | None = None, partition_size: int | None = None,
                           tile: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None) -> torch.Tensor:
    """q: [B, H, d]; caches [num_blocks, block_size, kvh, d]; block_tables [B, max_blocks] int32;
    seq_lens [B] (context including the query token). Returns [B, H, d] in q's dtype.

    No device sync: max_seq_len is optional and, when given, only lets short batches skip the split.
    sliding_window: the query sees only the last `sliding_window` keys (None or 0 = all).
    k_scale / v_scale: one-element float32 tensors, used with an fp8 cache (None = 1.0).

    The other keyword-only knobs (the dispatcher never passes them): num_splits (None = choose_num_splits, 1 = no split,
    S = each sequence cut into up to S pieces of at least min_partition tokens, default MIN_PARTITION);
    partition_size (fixed tokens per piece, rounded up to a multiple of `tile`; 0 = no split; this one reads
    max_seq_len or syncs on seq_lens.max()); tile = tokens per inner step (power of two >= 16).
    """
    B, H, D = q.shape
    nb, bs, kvh, dk = k_cache.shape
    assert dk == D and H % kvh == 0 and v_cache.shape == k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    G = H // kvh
    window = int(sliding_window) if sliding_window else NO_WINDOW
    if max_seq_len is not None:
        max_seq_len = min(int(max_seq_len), window)  # what one sequence can attend to
    tile = int(tile or DEFAULT_TILE)
    num_warps = int(num_warps or DEFAULT_WARPS)
    num_stages = int(num_stages or DEFAULT_STAGES)
    assert tile >= 16 and tile & (tile - 1) == 0, "tile must be a power of two >= 16"
    if partition_size is not None:
        if partition_size > 0:
            # S pieces of exactly min_part: cdiv(len, S) <= min_part for every len <= L.
            L = max(1, int(max_seq_len) if max_seq_len is not None else min(int(seq_lens.max()), window))
            min_part = triton.cdiv(int(partition_size), tile) * tile
            num_splits = triton.cdiv(L, min_part)
        else:
            num_splits = 1
    else:
        if num_splits is None:
            num_splits = choose_num_splits(B, kvh, q.device, max_seq_len)
        min_part = int(min_partition or MIN_PARTITION)
    num_splits = int(num_splits)
    split = num_splits > 1
    if not split:
        min_part = 0
    D_P2 = next_pow2(D)
    G_P2 = max(16, next_pow2(G))
    qk_scale = float(scale) * _LOG2E
    if split:
        part_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = out  # unused
        part_lse = out
    fp8, ks, vs = kv_scales(k_cache, k_scale, v_scale)
    _decode_stage1_kernel[(B, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse, ks, vs, qk_scale, num_splits, min_part,
        window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2) if split else 0,
        part_lse.stride(0), part_lse.stride(1),
        G=G, G_P2=G_P2, D=D, D_P2=D_P2, BLOCK_SIZE=bs, TILE=tile, SPLIT=split,
        DOT_PREC=dot_precision(q.dtype), INTERP=interpreting(), KV_FP8=fp8, num_warps=num_warps,
        num_stages=num_stages,
    )
    if split:
        _decode_stage2_kernel[(B, H)](
            part_o, part_lse, seq_lens, out, num_splits, min_part, window,
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            CHUNK=min(16, next_pow2(num_splits)), D=D, D_P2=D_P2, TILE=tile, num_warps=2,
        )
    return out
