"""Paged varlen causal prefill attention with a cached prefix.

Query token i of sequence b (q_len_b new tokens, context seq_lens[b] after this step) sits at position
ctx_b + i, ctx_b = seq_lens[b] - q_len_b, and sees keys 0..ctx_b + i, read from the paged cache (the new
tokens' K/V are already written there).

Grid: (T // BLOCK_M + B, H). Program slots of sequence b start at query_start_loc[b] // BLOCK_M + b, which
leaves each sequence at least cdiv(q_len_b, BLOCK_M) slots; a program finds its sequence by counting the
starts at or below its id, and spare slots exit at once. So the launch needs no device-to-host sync.
Within a sequence, slots map to query tiles last-first, so the tiles with the most keys start earliest.
Each program owns BLOCK_M queries of one head: key tiles wholly below its first query's position run
without a mask, the diagonal tiles with the causal mask, nothing beyond its last query's position.

Sliding window W (a runtime int; NO_WINDOW = none): query p sees keys p - W + 1 .. p. Key tiles wholly older
than the first query's window are skipped; those older than the last query's window edge run with the mask.

FP8 cache (float8_e4m3fn, KV_FP8): K/V tiles are loaded as e4m3 and widened to q's dtype; k_scale is folded into
the softmax scale and v_scale into the output (per tensor: exact), read from one-element tensors on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import dot_precision, interpreting, mm, next_pow2
from strata.ops.triton_kernels.cache import kv_scales

_LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # a window longer than any context: every key is visible


@triton.jit
def _prefill_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, head_off, n0, kv_len, qpos, d,
                  s_cb, s_cs, qk_scale, window,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                  MASKED: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        nmask = offs_n < kv_len
        page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    row = page * s_cb + (offs_n % BLOCK_SIZE).to(tl.int64) * s_cs + head_off  # [BLOCK_N]
    ptrs = row[:, None] + d[None, :]
    if MASKED:
        if D == D_P2:
            lmask = nmask[:, None]
        else:
            lmask = nmask[:, None] & (d[None, :] < D)
        k = tl.load(k_cache_ptr + ptrs, mask=lmask, other=0.0)
        v = tl.load(v_cache_ptr + ptrs, mask=lmask, other=0.0)
    else:
        if D == D_P2:
            k = tl.load(k_cache_ptr + ptrs)
            v = tl.load(v_cache_ptr + ptrs)
        else:
            dmask = (d < D)[None, :]
            k = tl.load(k_cache_ptr + ptrs, mask=dmask, other=0.0)
            v = tl.load(v_cache_ptr + ptrs, mask=dmask, other=0.0)
    s = mm(q, tl.trans(k.to(q.dtype)), DOT_PREC, INTERP) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] > qpos[:, None] - window) & nmask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = m_new
    if MASKED:  # a row may see none of these keys yet (window edge): keep exp2(-inf - -inf) from making NaN
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mm(p.to(q.dtype), v.to(q.dtype), DOT_PREC, INTERP)
    return acc, m_new, l_i


# Ints that change from step to step are not specialised on (==1, %16): each value class would otherwise
# compile its own variant in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "window", "s_btb"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr,                   # fp8 cache: one float32 each (read value = stored * scale)
    qk_scale, num_seqs, window,
    s_qt, s_qh, s_ot, s_oh,                     # q / out: [T, H, d], last dim contiguous
    s_cb, s_cs, s_ch,                           # caches: [num_blocks, block_size, kvh, d]
    s_btb,
    G: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, B_P2: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, KV_FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    idx = tl.arange(0, B_P2)
    starts = tl.load(qsl_ptr + idx, mask=idx < num_seqs, other=0).to(tl.int32) // BLOCK_M + idx
    starts = tl.where(idx < num_seqs, starts, 2147483647)
    b = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
    if b < 0:
        return
    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    n_tiles = tl.cdiv(q_len, BLOCK_M)
    slot = pid - (q_start // BLOCK_M + b)
    if slot >= n_tiles:
        return
    mt = n_tiles - 1 - slot  # the longest (last, most keys) tiles of a sequence launch first
    kv_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    ctx = kv_len - q_len

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_P2)
    mmask = offs_m < q_len
    if D == D_P2:
        qmask = mmask[:, None]
    else:
        qmask = mmask[:, None] & (d[None, :] < D)
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * s_qt + h * s_qh + d[None, :], mask=qmask, other=0.0)  # [BLOCK_M, D_P2]
    qpos = ctx + offs_m
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_btb
    head_off = (h // G).to(tl.int64) * s_ch
    # Keys at or below the tile's first query position and inside its last query's window are visible to
    # every row: whole tiles of them go unmasked. Tiles before that (window edge) and after (diagonal) are
    # masked; tiles wholly older than the first query's window are skipped.
    first_q = ctx + mt * BLOCK_M
    kv_end = tl.minimum(kv_len, ctx + (mt + 1) * BLOCK_M)
    win_start = (tl.maximum(first_q - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_end = (first_q // BLOCK_N) * BLOCK_N
    full_start = tl.minimum(tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N, full_end)
    for n0 in range(win_start, full_start, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, head_off, n0, kv_len,
                                      qpos, d, s_cb, s_cs, qk_scale, window, BLOCK_SIZE, BLOCK_N, D, D_P2, True,
                                      DOT_PREC, INTERP)
    for n0 in range(full_start, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, head_off, n0, kv_len,
                                      qpos, d, s_cb, s_cs, qk_scale, window, BLOCK_SIZE, BLOCK_N, D, D_P2, False,
                                      DOT_PREC, INTERP)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, head_off, n0, kv_len,
                                      qpos, d, s_cb, s_cs, qk_scale, window, BLOCK_SIZE, BLOCK_N, D, D_P2, True,
                                      DOT_PREC, INTERP)
    # every query row sees its own key, so l_i > 0; only the padding rows past q_len can have none in the window
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    tl.store(out_ptr + tok[:, None] * s_ot + h * s_oh + d[None, :], o.to(out_ptr.dtype.element_ty), mask=qmask)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, *, sliding_window: int | None = None,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                            block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """q: [T, H, d]; query_start_loc: [B+1]; seq_lens: [B]. Returns [T, H, d] in q's dtype.

    Rows of q outside every [query_start_loc[b], query_start_loc[b+1]) range are left unwritten.
    sliding_window: each query sees only its own key and the sliding_window - 1 before it (None or 0 = all).
    k_scale / v_scale: one-element float32 tensors, used with an fp8 cache (None = 1.0).
    The other keyword-only knobs are for benchmarks; the dispatcher never passes them.
    """
    T, H, D = q.shape
    nb, bs, kvh, dk = k_cache.shape
    assert dk == D and H % kvh == 0 and v_cache.shape == k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    B = seq_lens.shape[0]
    if T == 0 or B == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    D_P2 = next_pow2(D)
    wide = q.element_size() >= 4 or D_P2 > 128
    block_m = int(block_m or (64 if wide else 128))
    block_n = int(block_n or (32 if wide else 64))
    num_warps = int(num_warps or (4 if wide or block_m < 128 else 8))
    num_stages = int(num_stages or (1 if wide else 2))
    grid = (T // block_m + B, H)
    fp8, ks, vs = kv_scales(k_cache, k_scale, v_scale)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, ks, vs, float(scale) * _LOG2E, B,
        int(sliding_window) if sliding_window else NO_WINDOW,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=H // kvh, D=D, D_P2=D_P2, BLOCK_SIZE=bs, BLOCK_M=block_m, BLOCK_N=block_n, B_P2=next_pow2(B),
        DOT_PREC=dot_precision(q.dtype), INTERP=interpreting(), KV_FP8=fp8, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
