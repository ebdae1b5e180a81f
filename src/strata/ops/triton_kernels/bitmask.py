"""apply_token_bitmask: structured outputs' allowed-token bitmask onto the logits rows, in place."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, s_l, s_b, V, W, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    word_idx = cols // 32
    words = tl.load(bitmask_ptr + i * s_b + word_idx, mask=inside & (word_idx < W), other=0)
    allowed = ((words >> (cols % 32)) & 1) != 0
    neg_inf = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * s_l + cols, neg_inf, mask=inside & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (last dim contiguous), bitmask [K, W] int32, rows [K] int64 -> logits, edited in place."""
    K, W = bitmask.shape
    V = logits.shape[1]
    if K == 0:
        return logits
    assert logits.stride(1) == 1 and bitmask.is_contiguous()
    BLOCK = 2048
    _apply_token_bitmask_kernel[(K, triton.cdiv(V, BLOCK))](logits, bitmask, rows, logits.stride(0),
                                                           bitmask.stride(0), V, W, BLOCK=BLOCK, num_warps=4)
    return logits
