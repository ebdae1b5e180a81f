"""The attention input epilogue in one kernel: per-head q/k RMSNorm (Qwen3), neox rotary on q and k, and the
K/V write into the paged cache. Unfused this is up to seven launches per layer (two copies of strided views, two
norms, rotary, a copy of v, the cache write); at batch 1 a decode step is launch-bound, not bandwidth-bound.

One program per token. Rounding follows the unfused ops exactly: the normed q/k are rounded to the input dtype
before the rotation, which runs in fp32 and rounds once more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import next_pow2
from strata.ops.triton_kernels.rotary import cos_sin


@triton.jit
def _norm_rotate(x_ptr, w_ptr, row, NH, cos, sin, eps, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                 NH_P2: tl.constexpr, HALF_P2: tl.constexpr, QK_NORM: tl.constexpr, OUT_TY: tl.constexpr):
    """Heads [NH, HEAD_DIM] starting at x_ptr + row: normed (optionally) and rotated halves (fp32)."""
    h = tl.arange(0, NH_P2)
    j = tl.arange(0, HALF_P2)
    mask = (h[:, None] < NH) & (j[None, :] < HALF)
    base = row + h[:, None] * HEAD_DIM + j[None, :]
    x1 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        r = tl.rsqrt(var + eps)
        jm = j < HALF
        w1 = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=jm, other=0.0).to(tl.float32)
        x1 = (x1 * r[:, None] * w1[None, :]).to(OUT_TY).to(tl.float32)
        x2 = (x2 * r[:, None] * w2[None, :]).to(OUT_TY).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    return o1, o2, h, j, mask


@triton.jit
def _qkv_epilogue_kernel(
    qkv_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    s_t, s_qo, s_cs,                   # qkv / q_out token strides, cos_sin_cache row stride
    s_cb, s_cslot, s_ch,               # cache block, slot-in-block and head strides (K and V alike)
    eps, H, KVH,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, H_P2: tl.constexpr,
    KVH_P2: tl.constexpr, HALF_P2: tl.constexpr, D_P2: tl.constexpr, QK_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin = cos_sin(cs_ptr, pos, s_cs, HALF, HALF_P2)
    ty = q_out_ptr.dtype.element_ty
    row = t * s_t

    o1, o2, h, jj, mask = _norm_rotate(qkv_ptr, qw_ptr, row, H, cos, sin, eps, HEAD_DIM, HALF, H_P2, HALF_P2,
                                       QK_NORM, ty)
    dst = t * s_qo + h[:, None] * HEAD_DIM + jj[None, :]
    tl.store(q_out_ptr + dst, o1.to(ty), mask=mask)
    tl.store(q_out_ptr + dst + HALF, o2.to(ty), mask=mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        cache = (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_cslot
        cty = k_cache_ptr.dtype.element_ty
        k1, k2, kh, kj, kmask = _norm_rotate(qkv_ptr, kw_ptr, row + H * HEAD_DIM, KVH, cos, sin, eps, HEAD_DIM,
                                             HALF, KVH_P2, HALF_P2, QK_NORM, ty)
        kdst = cache + kh[:, None] * s_ch + kj[None, :]
        tl.store(k_cache_ptr + kdst, k1.to(ty).to(cty), mask=kmask)
        tl.store(k_cache_ptr + kdst + HALF, k2.to(ty).to(cty), mask=kmask)
        vh = tl.arange(0, KVH_P2)
        d = tl.arange(0, D_P2)
        vmask = (vh[:, None] < KVH) & (d[None, :] < HEAD_DIM)
        v = tl.load(qkv_ptr + row + (H + KVH) * HEAD_DIM + vh[:, None] * HEAD_DIM + d[None, :], mask=vmask)
        tl.store(v_cache_ptr + cache + vh[:, None] * s_ch + d[None, :], v.to(v_cache_ptr.dtype.element_ty),
                 mask=vmask)


def qkv_epilogue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv: [T, (H + 2 kvh) d] (rows may be strided). Returns q [T, H*d] (normed, rotated, contiguous); writes
    the normed, rotated K and the V of every token with slot >= 0 into the caches."""
    T = qkv.shape[0]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and head_dim % 2 == 0
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty((T, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q_out
    qk_norm = q_norm_weight is not None
    half = head_dim // 2
    _qkv_epilogue_kernel[(T,)](
        qkv, positions, cos_sin_cache, q_norm_weight if qk_norm else qkv, k_norm_weight if qk_norm else qkv,
        q_out, k_cache, v_cache, slot_mapping,
        qkv.stride(0), q_out.stride(0), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        float(eps), num_heads, num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, HALF=half, H_P2=next_pow2(num_heads),
        KVH_P2=next_pow2(num_kv_heads), HALF_P2=next_pow2(half), D_P2=next_pow2(head_dim), QK_NORM=qk_norm,
        num_warps=4 if num_heads * head_dim >= 2048 else 1,
    )
    return q_out
