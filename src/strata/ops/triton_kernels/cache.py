"""reshape_and_cache: scatter each new token's K/V into its paged-cache slot (slot -1: skip).

An fp8 cache (float8_e4m3fn) stores clamp(x / scale, -448, 448) rounded to e4m3, with the layer's k_scale and
v_scale read from one-element float32 tensors (so a CUDA graph captured with them stays valid)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from strata.ops.triton_kernels._utils import next_pow2


@functools.lru_cache(maxsize=None)
def unit_scale(device: torch.device) -> torch.Tensor:
    """A float32 1.0 on `device`: the scale of an fp8 cache called without one."""
    return torch.ones(1, dtype=torch.float32, device=device)


def kv_scales(cache: torch.Tensor, k_scale: torch.Tensor | None,
              v_scale: torch.Tensor | None) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(is the cache fp8, k_scale, v_scale) for a launch: missing scales are 1.0; a non-fp8 cache ignores them
    (the cache itself is passed in their place, never read)."""
    if cache.dtype != torch.float8_e4m3fn:
        return False, cache, cache
    one = None if k_scale is not None and v_scale is not None else unit_scale(cache.device)
    return True, (k_scale if k_scale is not None else one), (v_scale if v_scale is not None else one)


@triton.jit
def _round_to_e4m3(y):
    """fp32 y (|y| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32: adding and removing
    1.5 * 2^(k + 23), k = log2 of the e4m3 spacing at |y|, leaves y rounded to a multiple of 2^k. The cast that
    follows is then exact. (The GPU's cvt rounds the same way; the interpreter's cast (triton 3.9) rounds ties
    up and drops the carry of a mantissa that rounds up to the next power of two, e.g. 126 -> 64.)"""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # the binade of |y| (-127 for 0)
    k = tl.maximum(e, -6) - 3  # e4m3: 3 mantissa bits; below 2^-6 subnormal, spacing 2^-9
    c = ((k + 150) << 23).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^(k + 23)
    r = (y + c) - c
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)  # -0 stays -0


@triton.jit
def _quantize(x, scale_ptr, FP8: tl.constexpr):
    """x as the cache stores it: unchanged, or (fp8) x / scale clamped to the e4m3 range and rounded to it."""
    if FP8:
        y = tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr))  # IEEE division, as torch divides
        return _round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))  # 448: the largest finite e4m3fn
    else:
        return x


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    s_kt, s_kh, s_vt, s_vh,            # key/value token and head strides (last dim contiguous)
    s_cb, s_cs, s_ch,                  # cache block, slot-in-block and head strides (same for K and V)
    BLOCK_SIZE: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
    KVH_P2: tl.constexpr, D_P2: tl.constexpr, FP8: tl.constexpr,
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
    k = _quantize(tl.load(key_ptr + t * s_kt + h[:, None] * s_kh + d[None, :], mask=mask), k_scale_ptr, FP8)
    v = _quantize(tl.load(value_ptr + t * s_vt + h[:, None] * s_vh + d[None, :], mask=mask), v_scale_ptr, FP8)
    dst = blk * s_cb + off * s_cs + h[:, None] * s_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> None:
    """key/value: [T, kvh, d]; k_cache/v_cache: [num_blocks, block_size, kvh, d]; slot_mapping: [T].
    k_scale / v_scale: one-element float32 tensors, used with an fp8 cache (None = 1.0)."""
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
    fp8, ks, vs = kv_scales(k_cache, k_scale, v_scale)
    _reshape_and_cache_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping, ks, vs,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=bs, KVH=kvh, D=d, KVH_P2=next_pow2(kvh), D_P2=next_pow2(d), FP8=fp8,
        num_warps=4 if kvh * d >= 1024 else 1,
    )
