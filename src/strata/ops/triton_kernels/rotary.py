"""Neox-style rotary embedding (rotate halves); one program per token handles all q and k heads."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import next_pow2


@triton.jit
def _rotate(src_ptr, dst_ptr, s_src, s_dst, t, cos, sin, NH, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
            NH_P2: tl.constexpr, HALF_P2: tl.constexpr):
    h = tl.arange(0, NH_P2)
    j = tl.arange(0, HALF_P2)
    mask = (h[:, None] < NH) & (j[None, :] < HALF)
    base = h[:, None] * HEAD_DIM + j[None, :]
    x1 = tl.load(src_ptr + t * s_src + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + t * s_src + base + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + t * s_dst + base, o1.to(ty), mask=mask)
    tl.store(dst_ptr + t * s_dst + base + HALF, o2.to(ty), mask=mask)


@triton.jit
def cos_sin(cs_ptr, pos, s_cs, HALF: tl.constexpr, HALF_P2: tl.constexpr):
    """The position's cos and sin rows ([HALF_P2] fp32 each) from a [max_pos, 2*HALF] cos|sin cache."""
    j = tl.arange(0, HALF_P2)
    jm = j < HALF
    cos = tl.load(cs_ptr + pos * s_cs + j, mask=jm, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + j, mask=jm, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, qo_ptr, ko_ptr, s_q, s_k, s_qo, s_ko, s_cs, NQ, NK,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NQ_P2: tl.constexpr, NK_P2: tl.constexpr,
                   HALF_P2: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin = cos_sin(cs_ptr, pos, s_cs, HALF, HALF_P2)
    _rotate(q_ptr, qo_ptr, s_q, s_qo, t, cos, sin, NQ, HEAD_DIM, HALF, NQ_P2, HALF_P2)
    _rotate(k_ptr, ko_ptr, s_k, s_ko, t, cos, sin, NK, HEAD_DIM, HALF, NK_P2, HALF_P2)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H*d], k: [T, kvh*d] (rows may be strided, e.g. views of a fused qkv); cos_sin_cache: [max_pos, d].

    Returns new contiguous (q, k); the rotation is computed in fp32.
    """
    T = q.shape[0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    nq = q.shape[1] // head_dim
    nk = k.shape[1] // head_dim
    half = head_dim // 2
    elems = (nq + nk) * head_dim
    _rotary_kernel[(T,)](
        positions, q, k, cos_sin_cache, q_out, k_out,
        q.stride(0), k.stride(0), q_out.stride(0), k_out.stride(0), cos_sin_cache.stride(0), nq, nk,
        HEAD_DIM=head_dim, HALF=half, NQ_P2=next_pow2(nq), NK_P2=next_pow2(nk), HALF_P2=next_pow2(half),
        num_warps=4 if elems >= 2048 else 1,
    )
    return q_out, k_out
