"""reshape_and_cache: scatter each new token's K/V into its paged-cache slot (slot -1: skip)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import next_pow2


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    s_kt, s_kh, s_vt, s_vh,            # key/value token and head strides (last dim contiguous)
    s_cb, s_cs, s_ch,                  # cache block, slot-in-block and head strides (same for K and V)
    BLOCK_SIZE: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
    KVH_P2: tl.constexpr, D_P2: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, KVH_P2)
    d = tl.arange(0, D_P2)
    mask = (h[:, None] < KVH) & (d[None, :] < D)
    k = tl.load(key_ptr + t * s_kt + h[:, None] * s_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + t * s_vt + h[:, None] * s_vh + d[None, :], mask=mask)
    dst = blk * s_cb + off * s_cs + h[:, None] * s_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """key/value: [T, kvh, d]; k_cache/v_cache: [num_blocks, block_size, kvh, d]; slot_mapping: [T]."""
    T, kvh, d = key.shape
    if T == 0:
        return
    nb, bs, ckvh, cd = k_cache.shape
    assert (ckvh, cd) == (kvh, d) and v_cache.shape == k_cache.shape and value.shape == key.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _reshape_and_cache_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=bs, KVH=kvh, D=d, KVH_P2=next_pow2(kvh), D_P2=next_pow2(d),
        num_warps=4 if kvh * d >= 1024 else 1,
    )
