"""Pure-torch reference ops (the "twins" every Triton kernel is checked against). They run on CPU and GPU.

Paged KV-cache layout, shared by every backend:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset_in_block; slot -1 means "do not write" (padding).
    block_tables: [num_seqs, max_blocks_per_seq] int32, padded with 0 (never read past seq_lens).

Sliding window (`sliding_window` W, None or 0 = off): the query at position p sees keys p - W + 1 .. p, its
own key and the W - 1 before it (transformers' `kv_idx > q_idx - sliding_window`).

FP8 KV cache (`--kv-cache-dtype fp8`): caches of dtype float8_e4m3fn, with one float32 `k_scale` and `v_scale` per
layer (tensors of one element; None = 1.0). The write stores clamp(x / scale, -448, 448) cast to e4m3 (values
past the e4m3 range saturate, never NaN); a read is stored * scale. The scales are used only with an fp8 cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


FP8_KV = torch.float8_e4m3fn  # the FP8 KV-cache dtype (vLLM's fp8 / fp8_e4m3)
FP8_KV_MAX = 448.0  # largest finite e4m3fn value


def is_fp8_kv(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [..] -> e4m3: clamp(x / scale, -448, 448), rounded to nearest even (what the cache write stores)."""
    xf = x.float() if scale is None else x.float() / scale.float()
    return xf.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """What attention reads from a cache slice: stored * scale (fp8 cache) in `dtype`; other caches as stored."""
    if not is_fp8_kv(x) or scale is None:
        return x.to(dtype)
    return (x.float() * scale.float()).to(dtype)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> None:
    """key/value: [T, kvh, d]; writes each token's K/V into its slot. Slots < 0 are skipped. An fp8 cache
    stores quantize_kv(key, k_scale) and quantize_kv(value, v_scale)."""
    nb, bs, kvh, d = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if is_fp8_kv(k_cache):  # index_copy_ has no float8 kernel on the CPU: copy the bytes
        k_cache.view(torch.uint8).view(nb * bs, kvh, d).index_copy_(
            0, slot_mapping.long(), quantize_kv(key, k_scale).view(torch.uint8))
        v_cache.view(torch.uint8).view(nb * bs, kvh, d).index_copy_(
            0, slot_mapping.long(), quantize_kv(value, v_scale).view(torch.uint8))
        return
    k_cache.view(nb * bs, kvh, d).index_copy_(0, slot_mapping.long(), key.to(k_cache.dtype))
    v_cache.view(nb * bs, kvh, d).index_copy_(0, slot_mapping.long(), value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence's K or V: [length, kvh, d]."""
    nb, bs, kvh, d = cache.shape
    nblk = (length + bs - 1) // bs
    return cache.index_select(0, block_table[:nblk].long()).reshape(nblk * bs, kvh, d)[:length]


DECODE_GROUP = 16  # CPU: sequences of similar length are padded together, in groups of this size


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int | None = None, sliding_window: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence. On CPU, large batches are sorted by length and attended in groups, so
    that a short sequence is not padded (gathered and masked) to the longest one in the batch.
    An fp8 cache is read as stored * k_scale / v_scale (`dequantize_kv`)."""
    B = q.shape[0]
    kv_scales = (k_scale, v_scale)
    if q.device.type != "cpu" or B <= DECODE_GROUP:
        return _decode_padded(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, sliding_window,
                              *kv_scales)
    lens = seq_lens.tolist()
    order = sorted(range(B), key=lens.__getitem__)
    out = torch.empty_like(q)
    for i in range(0, B, DECODE_GROUP):
        idx = order[i:i + DECODE_GROUP]
        rows = torch.tensor(idx)
        out[rows] = _decode_padded(q[rows], k_cache, v_cache, block_tables[rows], seq_lens[rows], scale,
                                   lens[idx[-1]], sliding_window, *kv_scales)
    return out


def _decode_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                   max_seq_len: int | None = None, sliding_window: int | None = None,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence. q: [B, H, d]; seq_lens: [B] (context incl. the query token).

    Returns [B, H, d]. Gathers every sequence's keys padded to the longest and masks the tail; one fused
    SDPA call with native GQA (2x faster on CPU than an einsum formulation).
    """
    B, H, d = q.shape
    nb, bs, kvh, _ = k_cache.shape
    L = int(max_seq_len if max_seq_len is not None else seq_lens.max())
    nblk = (L + bs - 1) // bs
    idx = block_tables[:, :nblk].long().reshape(-1)
    k = k_cache.index_select(0, idx).view(B, nblk * bs, kvh, d)[:, :L].transpose(1, 2)  # [B, kvh, L, d]
    v = v_cache.index_select(0, idx).view(B, nblk * bs, kvh, d)[:, :L].transpose(1, 2)
    pos = torch.arange(L, device=q.device)
    lens = seq_lens[:, None].to(pos.device)
    mask = pos[None, :] < lens
    if sliding_window:
        mask &= pos[None, :] >= lens - sliding_window
    mask = mask.view(B, 1, 1, L)
    out = F.scaled_dot_product_attention(q.view(B, H, 1, d), dequantize_kv(k, k_scale, q.dtype),
                                         dequantize_kv(v, v_scale, q.dtype), attn_mask=mask,
                                         scale=scale, enable_gqa=kvh != H)
    return out.view(B, H, d)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float,
                            sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal attention over the paged cache (new tokens already written to it; an fp8 cache is read
    as stored * k_scale / v_scale).

    q: [T, H, d], tokens of sequence b are q[query_start_loc[b]:query_start_loc[b+1]].
    seq_lens[b] = context length after this step; query token i of sequence b sits at position
    seq_lens[b] - q_len_b + i and sees keys 0..that position (cached prefix included), or only the last
    `sliding_window` of them. Keys older than every query's window are not gathered.
    """
    T, H, d = q.shape
    kvh = k_cache.shape[2]
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        s, e, L = qsl[b], qsl[b + 1], lens[b]
        n = e - s
        if n == 0:
            continue
        lo = max(0, L - n - sliding_window + 1) if sliding_window else 0  # first key any query here sees
        k = gather_kv(k_cache, block_tables[b], L)[lo:]  # [L - lo, kvh, d]
        v = gather_kv(v_cache, block_tables[b], L)[lo:]
        # [1, heads, tokens, d], contiguous: the fused CPU kernels need it (strided inputs ran 5x slower)
        qb = q[s:e].transpose(0, 1).contiguous().unsqueeze(0)
        kb = dequantize_kv(k.transpose(0, 1), k_scale, q.dtype).contiguous().unsqueeze(0)
        vb = dequantize_kv(v.transpose(0, 1), v_scale, q.dtype).contiguous().unsqueeze(0)
        gqa = kvh != H
        if n == L and not sliding_window:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            qpos = torch.arange(L - n, L, device=q.device)
            kpos = torch.arange(lo, L, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]  # [n, L - lo]
            if sliding_window:
                mask &= kpos[None, :] > qpos[:, None] - sliding_window
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[s:e] = o[0].transpose(0, 1)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(torch.float32)).to(x.dtype) if x.dtype != torch.float32 else xf * weight


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual)."""
    r = x + residual
    return rms_norm(r, weight, eps), r


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary (rotate halves). q: [T, H*d], k: [T, kvh*d]; cos_sin_cache: [max_pos, d]
    holding cos of the d/2 frequencies then their sin. Returns new (q, k)."""
    cs = cos_sin_cache.index_select(0, positions.long())  # [T, d]
    cos, sin = cs.chunk(2, dim=-1)  # [T, d/2]
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        xs = x.view(T, -1, head_dim)
        x1, x2 = xs[..., : head_dim // 2], xs[..., head_dim // 2:]
        xf1, xf2 = x1.to(cos.dtype), x2.to(cos.dtype)
        o = torch.cat((xf1 * cos - xf2 * sin, xf2 * cos + xf1 * sin), dim=-1)
        return o.to(x.dtype).view(T, -1)

    return rot(q), rot(k)


def qkv_epilogue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, ops=None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention inputs from a fused qkv [T, (H + 2 kvh) d]: per-head RMSNorm of q and k (when weights are
    given), neox rotary, K/V written into the cache (slot -1 skipped; an fp8 cache with k_scale / v_scale).
    Returns q [T, H*d].
    `ops`: the module whose pieces to compose (default: these twins; strata.ops composes its dispatched ones)."""
    norm, rotate, cache = ((rms_norm, rotary_embedding, reshape_and_cache) if ops is None else
                           (ops.rms_norm, ops.rotary_embedding, ops.reshape_and_cache))
    T = qkv.shape[0]
    qs, ks = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([qs, ks, ks], dim=-1)
    if q_norm_weight is not None:
        q = norm(q.reshape(T, num_heads, head_dim), q_norm_weight, eps).reshape(T, qs)
        k = norm(k.reshape(T, num_kv_heads, head_dim), k_norm_weight, eps).reshape(T, ks)
    q, k = rotate(positions, q, k, cos_sin_cache, head_dim)
    cache(k.reshape(T, num_kv_heads, head_dim), v.reshape(T, num_kv_heads, head_dim), k_cache, v_cache,
          slot_mapping, k_scale, v_scale)
    return q


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Structured outputs: logits [B, V] (edited in place and returned), bitmask [K, W] int32 (bit t % 32 of
    word t // 32 set: token t allowed), rows [K] int64: the logits row of each bitmask row. Tokens not
    allowed, and columns past W * 32 (padded vocabulary rows), become -inf."""
    K, W = bitmask.shape
    V = logits.shape[1]
    if K == 0:
        return logits
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(K, W * 32).bool()  # [K, W * 32]
    if W * 32 < V:
        allowed = torch.cat([allowed, allowed.new_zeros(K, V - W * 32)], dim=1)
    logits[rows] = logits[rows].masked_fill(~allowed[:, :V], float("-inf"))
    return logits


# ---- FP8 (e4m3) linear layers: the twins of the FP8 GEMM kernels (weights stay float8_e4m3fn in memory) ----
FP8_E4M3_MAX = 448.0
# Rows (tokens) up to which an FP8 linear is weight-only ("W8A16": activations not quantised, the GPU's small-M
# kernel); above it activations are quantised too ("W8A8": torch._scaled_mm / the Triton W8A8 kernel). The twin
# and `strata.ops.fp8_linear` both read it at each call. Keep it a size of the decode CUDA-graph ladder (1, 2, 4,
# 8 or a multiple of 16), so that a batch and the padded batch its graph replays fall on the same side.
FP8_W8A16_MAX_M = 64


def fp8_dequantize(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None) -> torch.Tensor:
    """weight [N, K] float8_e4m3fn -> float32. scale: [N] (per output row; a per-tensor scale is stored per row)
    or, with block_size (bn, bk), [ceil(N / bn), ceil(K / bk)] (a partial last block is allowed)."""
    N, K = weight.shape
    w = weight.float()
    s = scale.float()
    if block_size is None:
        return w * s.reshape(-1, 1)
    bn, bk = block_size
    s = s.repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]
    return w * s


def fp8_quant_dequant(x: torch.Tensor, input_scale: torch.Tensor | None = None,
                      group: int | None = None) -> torch.Tensor:
    """x quantised to e4m3 and back (float32), as the FP8 GEMM quantises its activations: with `input_scale`
    one static scale; else dynamic, one scale per token (row), or per token and `group` consecutive columns."""
    xf = x.float()
    if input_scale is not None:
        s = input_scale.float().reshape(())
        return (xf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * s
    if group is None:
        s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_E4M3_MAX
        return (xf / s).to(torch.float8_e4m3fn).float() * s
    T, K = xf.shape
    pad = (-K) % group
    g = F.pad(xf, (0, pad)).view(T, -1, group)
    s = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_E4M3_MAX
    return ((g / s).to(torch.float8_e4m3fn).float() * s).view(T, K + pad)[:, :K]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               block_size: tuple[int, int] | None = None, input_scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, act_group: int | None = None) -> torch.Tensor:
    """y = act(x) @ dequant(weight).T (+ bias) in float32, returned in x's dtype. x [T, K]; weight [N, K] e4m3;
    weight_scale per `fp8_dequantize`. act: with T <= FP8_W8A16_MAX_M rows x as it is (weight-only, as the GPU's
    W8A16 kernel; `input_scale` unused); above, quantised per `fp8_quant_dequant` (static `input_scale`, else
    dynamic per token, or per token and `act_group` columns: the block-scaled checkpoints' 1 x 128 groups)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq = x2.float() if x2.shape[0] <= FP8_W8A16_MAX_M else fp8_quant_dequant(x2, input_scale, act_group)
    y = F.linear(xq, fp8_dequantize(weight, weight_scale, block_size),
                 None if bias is None else bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online quantisation of a [N, K] weight: (e4m3 weight, float32 scale per row [N]), scale = amax / 448."""
    wf = w.float()
    s = wf.abs().amax(dim=-1).clamp(min=1e-12) / FP8_E4M3_MAX
    return (wf / s[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), s
